"""Object stores (S3) behind the narrow interface in `base`."""
