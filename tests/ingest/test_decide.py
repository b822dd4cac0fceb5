"""ingest's pure decisions about sources, resubmissions and HTTP answers: no broker, no network."""

from __future__ import annotations

import pytest

from visionloop.contracts import ImageRejectReason
from visionloop.services.ingest import decide as policy
from visionloop.services.ingest.api import fields_from_pairs, requested, status_for
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.decide import Prior, Resubmission, resubmission
from visionloop.services.ingest.inspect import Refusal


def _reason(call, *args, **kwargs) -> ImageRejectReason:  # noqa: ANN001
    with pytest.raises(Refusal) as err:
        call(*args, **kwargs)
    assert err.value.message
    return err.value.reason


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT: not private, not global either
        ("240.0.0.1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 is judged as the IPv4 it carries
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_addresses_ingest_may_not_reach(address: str, kind: str | None) -> None:
    assert policy.address_problem(address, allow_private=False) == kind
    relaxed = policy.address_problem(address, allow_private=True)
    assert relaxed == (kind if kind in ("unspecified", "multicast") else None)


def test_every_resolved_address_is_checked() -> None:
    target = policy.http_target("http://images.example.com/a.jpg")
    policy.check_addresses(target, ["93.184.216.34"], allow_private=False)
    for addresses in (["93.184.216.34", "10.0.0.7"], ["127.0.0.1"], ["::ffff:169.254.169.254"]):
        assert _reason(policy.check_addresses, target, addresses, allow_private=False) is ImageRejectReason.FORBIDDEN_SOURCE
    assert _reason(policy.check_addresses, target, [], allow_private=False) is ImageRejectReason.UNREACHABLE


def test_urls_are_taken_apart_and_odd_ones_refused() -> None:
    target = policy.http_target("https://Bücher.Example:8443/x.jpg?v=1#frag")
    assert (target.host, target.port, target.host_header) == ("xn--bcher-kva.example", 8443, "xn--bcher-kva.example:8443")
    assert policy.http_target("http://[::1]/a").host_header == "[::1]"
    assert policy.http_target("http://[::1]/a").host_is_ip
    assert policy.http_target("https://a.example:443/").host_header == "a.example"
    assert _reason(policy.http_target, "ftp://a.example/x.jpg") is ImageRejectReason.FORBIDDEN_SOURCE
    assert _reason(policy.http_target, "http://user:pw@a.example/x.jpg") is ImageRejectReason.FORBIDDEN_SOURCE
    assert _reason(policy.http_target, "http:///x.jpg") is ImageRejectReason.INVALID_SUBMISSION
    assert _reason(policy.http_target, "http://a.example:99999/") is ImageRejectReason.INVALID_SUBMISSION
    for odd in ("http://a b.example/", "http://\x00.example/", "http://-a.example/", "http://a..example/"):
        assert _reason(policy.http_target, odd) is ImageRejectReason.INVALID_SUBMISSION, odd
    assert policy.http_target("http://Trailing.Dot.example./").host == "trailing.dot.example"


def test_host_allow_list() -> None:
    assert policy.host_allowed("anything.example", [])
    allowed = ["images.example.com", "*.cdn.example"]
    assert policy.host_allowed("IMAGES.example.com.", allowed)
    assert policy.host_allowed("eu.cdn.example", allowed)
    assert not policy.host_allowed("cdn.example", allowed)  # the wildcard is for subdomains
    assert not policy.host_allowed("evilcdn.example", allowed)
    assert not policy.host_allowed("images.example.com.evil.test", allowed)


def test_redirects_resolve_against_the_current_url() -> None:
    assert policy.redirect_location("http://a.example/x/y.jpg", "../z.jpg#f", 302) == "http://a.example/z.jpg"
    assert policy.redirect_location("http://a.example/", "//b.example/c", 301) == "http://b.example/c"
    assert _reason(policy.redirect_location, "http://a.example/", None, 302) is ImageRejectReason.UNREACHABLE


def test_declared_content_types() -> None:
    for fine in (None, "", "image/jpeg", "image/png; charset=binary", "application/octet-stream", "binary/octet-stream"):
        assert policy.content_type_problem(fine) is None, fine
    assert policy.content_type_problem("text/html; charset=utf-8").reason is ImageRejectReason.NOT_AN_IMAGE
    assert policy.content_type_problem("application/json").reason is ImageRejectReason.NOT_AN_IMAGE
    assert policy.content_type_problem("image/svg+xml").reason is ImageRejectReason.UNSUPPORTED_FORMAT
    assert policy.declared_size_problem("11", 10).reason is ImageRejectReason.TOO_LARGE
    assert policy.declared_size_problem("10", 10) is None
    assert policy.declared_size_problem("lies", 10) is None  # the stream is counted anyway


def test_s3_locations_and_buckets() -> None:
    assert policy.s3_location("s3://bucket/a/b c?.jpg") == ("bucket", "a/b c?.jpg")
    assert _reason(policy.s3_location, "s3://bucket") is ImageRejectReason.INVALID_SUBMISSION
    assert _reason(policy.check_bucket, "any", []) is ImageRejectReason.FORBIDDEN_SOURCE  # shut by default (issue 16, item 9)
    policy.check_bucket("any", ["*"])
    policy.check_bucket("mine", ["mine"])
    assert _reason(policy.check_bucket, "other", ["mine"]) is ImageRejectReason.FORBIDDEN_SOURCE


@pytest.mark.parametrize(
    ("prior", "sha", "decision"),
    [
        (None, "a", Resubmission.NEW),
        (None, None, Resubmission.NEW),
        (Prior("ingested", "a", True), "a", Resubmission.REPLAY),
        (Prior("ingested", "a", True), "b", Resubmission.CONFLICT),
        (Prior("ingested", "a", True), None, Resubmission.CONFLICT),  # the source broke since
        (Prior("rejected", "a", True), "a", Resubmission.REPLAY),  # the same bad bytes
        (Prior("rejected", "a", True), "b", Resubmission.NEW),  # fixed bytes, same id: try again
        (Prior("rejected", None, True), None, Resubmission.NEW),  # e.g. unreachable, try again
        (Prior("ingested", "a", False), "a", Resubmission.NEW),  # recorded before answers were kept
    ],
)
def test_resubmissions(prior: Prior | None, sha: str | None, decision: Resubmission) -> None:
    assert resubmission(prior, sha) is decision


def test_status_codes_of_refusals() -> None:
    assert status_for(ImageRejectReason.TOO_LARGE, {}) == 413
    assert status_for(ImageRejectReason.NOT_AN_IMAGE, {}) == 415
    assert status_for(ImageRejectReason.CORRUPT, {}) == 422
    assert status_for(ImageRejectReason.FORBIDDEN_SOURCE, {}) == 403
    assert status_for(ImageRejectReason.UNREACHABLE, {}) == 502
    assert status_for(ImageRejectReason.UNREACHABLE, {"timed_out": True}) == 504
    assert status_for(ImageRejectReason.INVALID_SUBMISSION, {"conflict": True}) == 409
    every_ingest_reason = [r for r in ImageRejectReason if r.value not in ("duplicate", "near_duplicate", "low_resolution", "blurry", "blob_missing")]
    assert all(400 <= status_for(r, {}) < 600 and status_for(r, {}) != 500 for r in every_ingest_reason)


def test_form_fields_become_a_submission() -> None:
    fields = requested(fields_from_pairs([
        ("project", "plant-3"), ("domain", "site=a"), ("domain", '{"camera": "gate-1"}'),
        ("metadata", '{"lot": "42"}'), ("captured_at", "2024-05-01T10:00:00+02:00"),
        ("source_system", "scada"), ("upstream_id", "u-1"), ("submission_id", "s-1"),
    ]))
    assert fields.project == "plant-3" and fields.submission_id == "s-1"
    assert fields.source.domain == {"site": "a", "camera": "gate-1"}
    assert fields.source.metadata == {"lot": "42"}
    assert fields.source.captured_at is not None and fields.source.captured_at.utcoffset() is not None
    assert requested({"project": "p"}).submission_id.startswith("http-")  # made up when not given


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("project", "Not A Slug")],
        [("project", "_system")],
        [("project", "p"), ("metadata", "{not json")],
        [("project", "p"), ("metadata", '{"n": 1}')],
        [("project", "p"), ("captured_at", "yesterday")],
        [("project", "p"), ("captured_at", "2024-05-01T10:00:00")],  # no time zone
        [("project", "p"), ("domain", "NoEquals")],
        [("project", "p"), ("domain", "Bad-Key=x")],
        [("project", "p"), ("project", "q")],
        [("project", "p"), ("colour", "red")],
        [("project", "p"), ("submission_id", "x" * 129)],
    ],
)
def test_bad_form_fields_are_invalid_submissions(pairs: list[tuple[str, str]]) -> None:
    assert _reason(lambda: requested(fields_from_pairs(pairs))) is ImageRejectReason.INVALID_SUBMISSION


def test_formats_must_be_ones_pillow_reads() -> None:
    assert IngestSettings(formats=["jpeg", "png"]).formats == ["JPEG", "PNG"]
    with pytest.raises(ValueError, match="JPG"):
        IngestSettings(formats=["JPG"])


def test_the_reserved_project_a_host_off_the_list_and_a_redirect_loop_are_refused_with_reasons() -> None:
    from visionloop.contracts import SYSTEM_PROJECT

    refused = policy.project_problem(SYSTEM_PROJECT)
    assert refused is not None and refused.reason is ImageRejectReason.INVALID_SUBMISSION and "reserved" in refused.message
    assert policy.project_problem("yard") is None
    target = policy.http_target("https://images.example.com/a.jpg")
    assert _reason(policy.check_host, target, ["cdn.example.com"]) is ImageRejectReason.FORBIDDEN_SOURCE
    policy.check_host(target, ["images.example.com"])  # on the list: no refusal
    loop = policy.too_many_redirects("https://images.example.com/a.jpg", 5)
    assert loop.reason is ImageRejectReason.UNREACHABLE and "more than 5 times" in loop.message
