"""The scripted demo's building blocks: a synthetic upstream world that streams scenes with
known ground truth (and the duplicates, small and broken files real feeds carry), and a simulated
annotator that labels and reviews through the labelling gateway's HTTP API."""
