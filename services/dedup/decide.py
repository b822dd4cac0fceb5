"""Is this image worth a person's or a model's time? The dedup/quality decision, pure.

Order matters: an exact duplicate is named as such whatever its quality; an image below the
resolution or sharpness floor is dropped before it can enter the near-duplicate index; only then
is it compared with the project's accepted images.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionloop.contracts import ImageRejectReason
from visionloop.services.dedup.config import Policy
from visionloop.services.dedup.index import Match


@dataclass(frozen=True)
class Verdict:
    """Accept, or reject with a reason, a sentence, and what it duplicates."""

    accepted: bool
    reason: ImageRejectReason | None = None
    message: str = ""
    duplicate_of: str | None = None
    distance: int | None = None
    details: dict[str, int | float | str | None] | None = None


ACCEPT = Verdict(accepted=True)


def check_quality(width: int, height: int, blur: float | None, policy: Policy) -> Verdict:
    """The resolution and sharpness floors."""
    if width < policy.min_width or height < policy.min_height:
        return Verdict(
            False,
            ImageRejectReason.LOW_RESOLUTION,
            f"{width}x{height} is below this project's floor of {policy.min_width}x{policy.min_height}",
            details={"width": width, "height": height, "min_width": policy.min_width, "min_height": policy.min_height},
        )
    if policy.min_blur_variance is not None and blur is not None and blur < policy.min_blur_variance:
        return Verdict(
            False,
            ImageRejectReason.BLURRY,
            f"sharpness (variance of the Laplacian) {blur:.1f} is below this project's floor of "
            f"{policy.min_blur_variance:.1f}",
            details={"blur_variance": round(blur, 3), "min_blur_variance": policy.min_blur_variance},
        )
    return ACCEPT


def check_exact(image_id: str, earlier_outcome: str | None, *, elsewhere: bool = False) -> Verdict:
    """The same bytes seen before, whatever was decided then. `elsewhere`: seen only in another
    project (which asked for a corpus-wide check): said without that project's decision."""
    if earlier_outcome is None:
        return ACCEPT
    if elsewhere:
        return Verdict(False, ImageRejectReason.DUPLICATE,
                       "the same bytes were submitted before, to another project (this project drops copies across projects)",
                       duplicate_of=image_id, distance=0, details={"across_projects": True})
    return Verdict(
        False,
        ImageRejectReason.DUPLICATE,
        f"the same bytes were submitted before (first decision: {earlier_outcome})",
        duplicate_of=image_id,
        distance=0,
        details={"first_outcome": earlier_outcome},
    )


def check_near(match: Match | None, policy: Policy) -> Verdict:
    """The nearest accepted image, if it is within the project's radius."""
    if match is None or match.distance > policy.near_duplicate_radius:
        return ACCEPT
    return Verdict(
        False,
        ImageRejectReason.NEAR_DUPLICATE,
        f"near duplicate of {match.image_id[:12]}… (pHash+dHash distance {match.distance} <= "
        f"radius {policy.near_duplicate_radius})",
        duplicate_of=match.image_id,
        distance=match.distance,
        details={"phash_distance": match.phash_distance, "dhash_distance": match.dhash_distance, "radius": policy.near_duplicate_radius},
    )
