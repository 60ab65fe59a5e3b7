"""S3 access points: parsing their ARNs and aliases, and naming what a write through one needs.

Requests to an access point ARN go to `NAME-ACCOUNT.s3-accesspoint.REGION.amazonaws.com`
(botocore builds that host itself; `use_arn_region` lets the ARN's region differ from the
client's). An alias (`NAME-...-s3alias`) is used like a bucket name. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from recgw_server.domain import ACCESS_POINT_ARN

ALIAS_SUFFIX = "-s3alias"


@dataclass(frozen=True)
class AccessPoint:
    partition: str
    region: str
    account: str
    name: str

    @property
    def arn(self) -> str:
        return f"arn:{self.partition}:s3:{self.region}:{self.account}:accesspoint/{self.name}"

    def objects_arn(self, prefix: str) -> str:
        """The resource of every object under `prefix` reached through this access point."""
        return f"{self.arn}/object/{prefix}*"

    @property
    def host(self) -> str:
        """The host name requests to this access point go to (AWS commercial partition)."""
        return f"{self.name}-{self.account}.s3-accesspoint.{self.region}.amazonaws.com"


def parse_access_point(bucket: str) -> AccessPoint | None:
    """The access point an ARN names; None for bucket names and aliases."""
    match = ACCESS_POINT_ARN.fullmatch(bucket)
    if not match or match["service"] != "s3":
        return None
    return AccessPoint(match["partition"], match["region"], match["account"], match["name"])


def is_alias(bucket: str) -> bool:
    return bucket.endswith(ALIAS_SUFFIX)


def objects_resource(bucket: str, prefix: str) -> str:
    """In IAM terms, the objects a tenant's uploads write: what s3:PutObject must be allowed on."""
    access_point = parse_access_point(bucket)
    if access_point is not None:
        return access_point.objects_arn(prefix)
    if is_alias(bucket):
        return f"arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME/object/{prefix}* (alias {bucket})"
    return f"arn:aws:s3:::{bucket}/{prefix}*"
