"""`make bench`: recgw beside raw gRPC, direct boto3, aws-crt and tusd (see bench.bench)."""
