"""``lesionserve models`` and ``lesionserve health``: what a server has loaded and whether it takes work."""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from service.cli.client import ServerError, add_client_flags, client_settings, get_models, open_client, send


def add_models_parser(parser: argparse.ArgumentParser) -> None:
    add_client_flags(parser)
    parser.add_argument("--json", action="store_true", help="Print the server's /v1/models answer as JSON.")


def add_health_parser(parser: argparse.ArgumentParser) -> None:
    add_client_flags(parser)


def models(args: argparse.Namespace) -> int:
    """Print the loaded model(s); 0, or 1 with the server's reason, or 2 when it cannot be reached."""
    settings = client_settings(args)
    try:
        with open_client(settings) as client:
            answer = get_models(client, settings, retries=0)
    except ServerError as exc:
        print(f"lesionserve: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for m in answer["models"]:
        print(f"{m['name']} {m['version']}  sha256 {m['sha256'][:16]}  {m['precision']}  on {m['provider']}")
        print(f"  classes: {', '.join(m['classes'])} (malignant: {', '.join(m['malignant_classes'])})")
        print(f"  input {m['input_size']}x{m['input_size']}, batches up to {m['max_batch_size']}")
        print(f"  malignancy threshold {m['malignancy_threshold']:g}; OOD check: {'yes' if m.get('ood') else 'no'}")
    return 0


def health(args: argparse.Namespace) -> int:
    """Print liveness and readiness; 0 when ready, 1 when alive but not ready, 2 when unreachable."""
    settings = client_settings(args)
    try:
        with open_client(settings) as client:
            live = send(client, "GET", "/healthz", retries=0)
            ready = send(client, "GET", "/readyz", retries=0)
    except httpx.TransportError as exc:
        print(f"{settings.url}: unreachable ({exc})")
        return 2
    status = ready.json().get("status", ready.reason_phrase) if ready.content else ready.reason_phrase
    print(f"{settings.url}: live={'yes' if live.status_code == 200 else 'no'} ready={status}")
    return 0 if ready.status_code == 200 else 1
