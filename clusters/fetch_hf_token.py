"""Put the Hugging Face token on this node, from the cloud's secret store, without ever printing it.

The cluster launcher runs this in every node's setup_commands (see aws.yaml and
gcp.yaml). It reads the token with the node's own identity (AWS instance
profile, GCP service account), so no secret is written in any config file,
runtime_env or job command. The token lands in ``$HF_HOME/token`` (default
``~/.cache/huggingface/token``) with mode 0600, which is where huggingface_hub
looks when ``HF_TOKEN`` is unset; every Ray worker on the node then finds it.

    python fetch_hf_token.py aws --secret-id ray-prune/hf-token --region us-east-1
    python fetch_hf_token.py aws --ssm-parameter /ray-prune/hf-token --region us-east-1
    python fetch_hf_token.py gcp --secret projects/PROJECT/secrets/hf-token/versions/latest

A node that cannot read the secret still comes up (a sweep over ungated models
does not need a token); a warning says why. Pass ``--required`` to make that an
error instead. Only the standard library is needed on GCP; AWS needs boto3.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

_GCP_METADATA_TOKEN = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
_GCP_SECRETS_API = "https://secretmanager.googleapis.com/v1/{name}:access"


def token_path() -> Path:
    """Where huggingface_hub reads a stored token: $HF_TOKEN_PATH, else $HF_HOME/token."""
    explicit = os.environ.get("HF_TOKEN_PATH")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "token"


class TokenError(ValueError):
    """The secret was read but does not hold a usable token. Its message never quotes the secret."""


def unwrap(value: str) -> str:
    """The bare token, also from a JSON secret such as {"HF_TOKEN": "..."} (the AWS console's key/value form)."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            raise TokenError("the secret looks like JSON but does not parse") from None
        for key in ("HF_TOKEN", "hf_token", "token"):
            if isinstance(data.get(key), str):
                return data[key].strip()
        strings = [v for v in data.values() if isinstance(v, str)]
        if len(strings) != 1:
            raise TokenError("the JSON secret has no HF_TOKEN key; store the bare token or {\"HF_TOKEN\": ...}")
        return strings[0].strip()
    return value


def write_token(value: str, path: Path) -> Path:
    """Write the token with mode 0600, atomically (temp file in the same folder, then rename)."""
    value = unwrap(value)
    if not value:
        raise TokenError("the secret is empty")
    if any(c.isspace() for c in value):
        raise TokenError("the secret holds whitespace inside it; store the bare token, nothing else")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".token-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fetch_aws(secret_id: str | None, ssm_parameter: str | None, region: str | None) -> str:
    import boto3  # installed by the cluster's setup_commands

    if secret_id:
        reply = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=secret_id)
        return reply["SecretString"]
    reply = boto3.client("ssm", region_name=region).get_parameter(Name=ssm_parameter, WithDecryption=True)
    return reply["Parameter"]["Value"]


def fetch_gcp(secret: str, timeout: float = 10.0) -> str:
    """Secret Manager's REST API with the VM's service-account token from the metadata server."""
    request = urllib.request.Request(_GCP_METADATA_TOKEN, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        access_token = json.load(reply)["access_token"]
    request = urllib.request.Request(_GCP_SECRETS_API.format(name=secret),
                                     headers={"Authorization": f"Bearer {access_token}"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        payload = json.load(reply)["payload"]["data"]
    return base64.b64decode(payload).decode("utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--required", action="store_true", help="exit 1 when the token cannot be fetched")
    sub = parser.add_subparsers(dest="cloud", required=True)
    aws = sub.add_parser("aws", help="AWS Secrets Manager or SSM Parameter Store (SecureString)")
    which = aws.add_mutually_exclusive_group(required=True)
    which.add_argument("--secret-id", help="Secrets Manager secret name or ARN holding the bare token")
    which.add_argument("--ssm-parameter", help="SSM parameter name (SecureString) holding the bare token")
    aws.add_argument("--region", default=None, help="default: the instance's configured region")
    gcp = sub.add_parser("gcp", help="GCP Secret Manager")
    gcp.add_argument("--secret", required=True, help="projects/PROJECT/secrets/NAME/versions/latest")
    return parser


def main(argv: Sequence[str] | None = None, fetchers: dict[str, Callable[..., str]] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fetchers = fetchers or {"aws": fetch_aws, "gcp": fetch_gcp}
    try:
        if args.cloud == "aws":
            value = fetchers["aws"](args.secret_id, args.ssm_parameter, args.region)
        else:
            value = fetchers["gcp"](args.secret)
        path = write_token(value, token_path())
    except Exception as e:  # never echo the secret: report the error's type and the source only
        source = getattr(args, "secret_id", None) or getattr(args, "ssm_parameter", None) or getattr(args, "secret", "")
        print(f"fetch_hf_token: could not store the HF token from {args.cloud} {source}: {type(e).__name__}"
              f"{': ' + str(e) if isinstance(e, TokenError) else ''}. Gated models (e.g. Llama 2) will fail "
              "to download; check the node's IAM permissions and the secret's name.", file=sys.stderr)
        return 1 if args.required else 0
    print(f"fetch_hf_token: HF token stored in {path} (mode 600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
