"""Entrypoint of the MLflow tracking-server image (docker/Dockerfile.mlflow).

Every setting comes from the environment (docker-compose.yml, cluster/kuberay/mlflow.yaml), so no
credential ends up in a command line, an image layer or `ps` output:

- MLFLOW_BACKEND_STORE_URI (required): postgresql://user:password@host:5432/db (or sqlite:///…).
- MLFLOW_ARTIFACTS_DESTINATION (required): s3://bucket/prefix or a folder. The server proxies all
  artifact traffic (`mlflow-artifacts:/` URIs), so clients need no S3 credentials.
- MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: an S3-compatible store such
  as MinIO; a missing bucket is created (a fresh MinIO starts empty).
- MLFLOW_WORKERS: uvicorn workers (default 2).
- MLFLOW_AUTH_ADMIN_PASSWORD: when set, MLflow's `basic-auth` app guards the server (config in
  MLFLOW_AUTH_CONFIG_PATH; MLflow creates the admin user with this password on first start).
  MLFLOW_FLASK_SERVER_SECRET_KEY must then be set too.
- MLFLOW_SERVER_ALLOWED_HOSTS: the Host headers MLflow accepts (read by MLflow itself); it must
  include the service name clients use, e.g. `mlflow:5000`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit


def server_command(env: Mapping[str, str]) -> list[str]:
    """The `mlflow server` command line for this environment; it holds no secret."""
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        if not env.get(key):
            raise SystemExit(f"mlflow_start: set {key} (see docker/.env.example)")
    # MLflow reads MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION itself: the
    # database password stays out of the command line.
    command = ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
    command += ["--workers", env.get("MLFLOW_WORKERS", "2")]
    if env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            raise SystemExit("mlflow_start: basic auth needs MLFLOW_FLASK_SERVER_SECRET_KEY too")
        command += ["--app-name", "basic-auth"]
    return command


def ensure_bucket(env: Mapping[str, str]) -> None:
    """Create the artifact bucket on an S3-compatible endpoint if it does not exist yet."""
    destination = urlsplit(env["MLFLOW_ARTIFACTS_DESTINATION"])
    if destination.scheme != "s3" or not env.get("MLFLOW_S3_ENDPOINT_URL"):
        return
    import boto3  # only this image has it
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"])
    try:
        s3.head_bucket(Bucket=destination.netloc)
    except ClientError:
        s3.create_bucket(Bucket=destination.netloc)
        print(f"mlflow_start: created bucket {destination.netloc}", flush=True)


def main() -> None:
    env = dict(os.environ)
    command = server_command(env)
    ensure_bucket(env)
    print("mlflow_start:", " ".join(command), flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
