"""visionloop: a closed loop that keeps object detectors learning from the images they see."""

__version__ = "0.1.0"
