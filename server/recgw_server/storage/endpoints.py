"""Where a tenant's requests go: the bucket's region, access points, the expected bucket owner.

Blocking botocore calls; run them in worker threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from recgw_server.domain import ACCESS_POINT_ARN, StorageTarget

log = logging.getLogger(__name__)

REGION_HEADER = "x-amz-bucket-region"
# Where an empty region falls back to when the store does not say where the bucket is.
FALLBACK_REGION = "us-east-1"


@dataclass(frozen=True)
class BucketProbe:
    """What HeadBucket told about a bucket."""

    region: str  # x-amz-bucket-region; empty when the store did not send it
    status: int  # HTTP status; 0 when no answer came
    error_code: str = ""


def probe_bucket(client: Any, bucket: str) -> BucketProbe:
    """HeadBucket, read for its region header.

    AWS sends `x-amz-bucket-region` with the 200, with the 301 of a wrong region and also with
    the 403 a write-only identity gets, so no permission is needed for it.
    """
    try:
        response = client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        metadata = exc.response.get("ResponseMetadata", {})
        headers = metadata.get("HTTPHeaders", {})
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return BucketProbe(
            str(headers.get(REGION_HEADER, "")), int(metadata.get("HTTPStatusCode", 0)), code
        )
    except botocore.exceptions.BotoCoreError as exc:
        return BucketProbe("", 0, type(exc).__name__)
    metadata = response["ResponseMetadata"]
    return BucketProbe(
        str(metadata.get("HTTPHeaders", {}).get(REGION_HEADER, "")),
        int(metadata.get("HTTPStatusCode", 200)),
    )


def access_point_region(bucket: str) -> str:
    """The region of an access point ARN; empty for bucket names and aliases."""
    arn = ACCESS_POINT_ARN.fullmatch(bucket)
    return arn["region"] if arn else ""


def discover_region(client: Any, target: StorageTarget) -> str:
    """The bucket's region, from a HeadBucket signed for us-east-1 (AWS answers it anywhere)
    by `client`, a client for that region."""
    probe = probe_bucket(client, target.bucket)
    if probe.region:
        log.info("bucket %s is in region %s (x-amz-bucket-region)", target.bucket, probe.region)
        return probe.region
    log.warning(
        "the store did not say which region bucket %s is in (HeadBucket %s %s); signing for %s",
        target.bucket,
        probe.status,
        probe.error_code,
        FALLBACK_REGION,
    )
    return FALLBACK_REGION


def expect_bucket_owner(client: Any, account_id: str) -> None:
    """Send `x-amz-expected-bucket-owner: account_id` with every request that accepts it.

    S3 then refuses (403) any request to a bucket of that name owned by another account.
    """

    def add_owner(params: dict[str, Any], model: Any, **_: Any) -> None:
        if "ExpectedBucketOwner" in model.input_shape.members:
            params.setdefault("ExpectedBucketOwner", account_id)

    client.meta.events.register("provide-client-params.s3", add_owner)
