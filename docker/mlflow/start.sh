#!/bin/sh
# Entry point of the MLflow server image (docker/Dockerfile.mlflow).
#
# `mlflow server` takes every setting from the environment (MLFLOW_HOST, MLFLOW_PORT,
# MLFLOW_WORKERS, MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION,
# MLFLOW_SERVER_ALLOWED_HOSTS, ...: see platform/mlflow/server.env); arguments are passed on
# (the image's default ones: `--app-name basic-auth`).
# With MLFLOW_CREATE_BUCKET=true the s3:// bucket of MLFLOW_ARTIFACTS_DESTINATION is created
# first when missing (the local compose stack; on a cloud, create the bucket yourself).
set -eu

if [ "${MLFLOW_CREATE_BUCKET:-false}" = "true" ]; then
    python - <<'PY'
import os
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

dest = urlparse(os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", ""))
if dest.scheme == "s3" and dest.netloc:
    s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
    try:
        s3.head_bucket(Bucket=dest.netloc)
    except ClientError:
        s3.create_bucket(Bucket=dest.netloc)
        print(f"mlflow-start: created bucket {dest.netloc}", flush=True)
PY
fi

exec mlflow server "$@"
