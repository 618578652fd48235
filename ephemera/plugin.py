"""`kubectl ephemera`: PreviewEnvironments seen and handled from kubectl (the `kubectl-ephemera` script).

kubectl runs any `kubectl-NAME` executable on PATH as `kubectl NAME`, and passes it the arguments
that follow, not its own flags: so the plugin takes `--kubeconfig`, `--context` and `-o` itself.
It reads the cluster through the same client as the operator, and the records database (for
`describe`) when EPHEMERA_DATABASE_URL names one.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ephemera import __version__
from ephemera.api.models import KIND, parse_time
from ephemera.api.naming import EXPIRES_AT_ANNOTATION, KEEP_ANNOTATION
from ephemera.cli import add_job_arguments, history_data, print_history, print_table, request_job, request_retry
from ephemera.durations import format_time, parse_duration
from ephemera.kube import Kube, KubeError, load_api_client
from ephemera.ledger import note

Obj = dict[str, Any]
OUTPUTS = ("json", "yaml", "wide")
# A records database that does not answer within this long is reported as unreachable.
RECORDS_TIMEOUT = 10.0
# Writes of an annotation that depends on what is there (extend) are retried this often on a conflict.
CONFLICT_ATTEMPTS = 5


def _kube(args: argparse.Namespace) -> Kube:
    kubeconfig = getattr(args, "kubeconfig", None)
    return Kube(
        load_api_client(Path(kubeconfig) if kubeconfig else None, pool_size=4, context=getattr(args, "context", None))
    )


def _output(args: argparse.Namespace) -> str | None:
    value: str | None = getattr(args, "output", None)
    return value


def _dump(data: Any, output: str) -> None:
    if output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(json.dumps(data, indent=2))


def _age(timestamp: str | None, now: datetime.datetime) -> str:
    """An age as kubectl prints it: 45s, 12m, 5h, 3d."""
    if not timestamp:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def list_environments(args: argparse.Namespace) -> int:
    kube = _kube(args)
    try:
        items = [
            obj
            for obj in kube.list_environments()
            if (args.phase is None or (obj.get("status") or {}).get("phase") == args.phase)
            and (args.repository is None or (obj.get("spec") or {}).get("repository") == args.repository)
        ]
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        kube.close()
    items.sort(key=lambda obj: obj["metadata"]["name"])
    output = _output(args)
    if output in ("json", "yaml"):
        _dump({"apiVersion": "v1", "kind": "List", "items": items}, output)
        return 0
    if not items:
        print("No PreviewEnvironments found.", file=sys.stderr)
        return 0
    now = datetime.datetime.now(datetime.UTC)
    wide = output == "wide"
    heading = ["NAME", "REPOSITORY", "PR", "PHASE", "REASON", "AGE", "URL", "POLICY"]
    if wide:
        heading += ["COMMIT", "NAMESPACE", "MESSAGE"]
    table = [heading]
    for obj in items:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        row = [
            obj["metadata"]["name"],
            str(spec.get("repository", "-")),
            str(spec.get("pullRequest", "-")),
            status.get("phase") or "Pending",
            status.get("reason") or "-",
            _age(obj["metadata"].get("creationTimestamp"), now),
            status.get("url") or "-",
            note(obj),
        ]
        if wide:
            commit = str(spec.get("commitSha", ""))[:7] or "-"
            row += [commit, status.get("namespace") or "-", status.get("message") or "-"]
        table.append(row)
    print_table(table)
    return 0


def _records(name: str) -> Obj:
    """The environment's history from the records database, or why it is not shown."""
    from pydantic import ValidationError

    from ephemera.config import get_settings

    try:
        settings = get_settings()
    except ValidationError as err:
        return {"available": False, "error": f"invalid EPHEMERA_* settings: {err.error_count()} problem(s)"}
    # The default (a SQLite file in the current folder) is the operator's local default, not this
    # user's database: only a URL the user named is read.
    if "database_url" not in settings.model_fields_set:
        return {"available": False, "error": "EPHEMERA_DATABASE_URL is not set; set it to the records database"}
    from ephemera.cli import read_history, safe_url

    try:
        found = asyncio.run(asyncio.wait_for(read_history(settings.database_url, name), RECORDS_TIMEOUT))
    except Exception as err:  # any failure to read (DNS, refused, auth, no schema) says the same: not reachable
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = safe_url(settings.database_url)
        return {"available": False, "error": f"records database {where} not reachable: {reason}"}
    return {"available": True, "found": found}


def describe(args: argparse.Namespace) -> int:
    kube = _kube(args)
    try:
        obj = kube.get_environment(args.name)
        if obj is None:
            print(f'error: previewenvironments "{args.name}" not found', file=sys.stderr)
            return 1
        events = kube.list_events(KIND, args.name)
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        kube.close()
    events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    records = _records(args.name)
    output = _output(args)
    if output in ("json", "yaml"):
        history = {k: v for k, v in records.items() if k != "found"}
        if records["available"]:
            history["history"] = history_data(records["found"])
        _dump({"object": obj, "events": events, "records": history}, output)
        return 0
    _print_description(obj, events, records)
    return 0


def _print_description(obj: Obj, events: list[Obj], records: Obj) -> None:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    fields = [
        ("Name", meta["name"]),
        ("Repository", spec.get("repository")),
        ("Pull request", spec.get("pullRequest")),
        ("Branch", spec.get("branch")),
        ("Commit", spec.get("commitSha")),
        ("Created", meta.get("creationTimestamp")),
        ("Phase", status.get("phase") or "Pending"),
        ("Reason", status.get("reason")),
        ("Message", status.get("message")),
        ("Namespace", status.get("namespace")),
        ("URL", status.get("url")),
        ("Retries", status.get("retries")),
        ("Policy", note(obj)),
    ]
    for label, value in fields:
        print(f"{label + ':':<14}{value if value not in (None, '') else '-'}")
    conditions = status.get("conditions") or []
    _section(
        "Conditions",
        ["TYPE", "STATUS", "REASON", "LAST TRANSITION", "MESSAGE"],
        [
            [c.get("type"), c.get("status"), c.get("reason"), c.get("lastTransitionTime"), c.get("message")]
            for c in conditions
        ],
    )
    _section(
        "Events",
        ["LAST SEEN", "TYPE", "REASON", "FROM", "MESSAGE"],
        [
            [
                e.get("lastTimestamp") or e.get("eventTime"),
                e.get("type"),
                e.get("reason"),
                e.get("reportingComponent") or (e.get("source") or {}).get("component"),
                e.get("message"),
            ]
            for e in events
        ],
    )
    print("Records:")
    if not records["available"]:
        print(f"  not shown: {records['error']}")
    elif not records["found"]:
        print("  <none>")
    else:
        print_history(records["found"], indent="  ")


def _section(title: str, heading: list[str], rows: list[list[Any]]) -> None:
    """A titled table, empty cells as `-`, or `<none>`."""
    print(f"{title}:")
    if not rows:
        print("  <none>")
        return
    print_table(
        [heading, *[[str(cell) if cell not in (None, "") else "-" for cell in row] for row in rows]], indent="  "
    )


def retry(args: argparse.Namespace) -> int:
    kube = _kube(args)
    try:
        return request_retry(kube, args.name)
    finally:
        kube.close()


def open_url(args: argparse.Namespace) -> int:
    kube = _kube(args)
    try:
        obj = kube.get_environment(args.name)
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        kube.close()
    if obj is None:
        print(f'error: previewenvironments "{args.name}" not found', file=sys.stderr)
        return 1
    status = obj.get("status") or {}
    url = status.get("url")
    if not url:
        phase = status.get("phase") or "Pending"
        print(f"error: {args.name} has no URL (phase {phase}; set EPHEMERA_ENVIRONMENT_URL)", file=sys.stderr)
        return 1
    print(url)
    if args.browser and not webbrowser.open(url):
        print("error: no browser could be started here; open the URL above yourself", file=sys.stderr)
        return 1
    return 0


Annotations = dict[str, str | None]


def _annotate(
    args: argparse.Namespace, change: Callable[[Obj], Annotations], done: Callable[[Annotations], str]
) -> int:
    """Write the annotations `change(obj)` returns (None removes one) with the object's resourceVersion,
    so that a concurrent writer is never overwritten unseen (a conflict reads again and retries), then
    print what was done, or the object with -o json|yaml."""
    kube = _kube(args)
    try:
        for _ in range(CONFLICT_ATTEMPTS):
            obj = kube.get_environment(args.name)
            if obj is None:
                print(f'error: previewenvironments "{args.name}" not found', file=sys.stderr)
                return 1
            annotations = change(obj)
            patch = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"], "annotations": annotations}}
            try:
                kube.patch_environment(args.name, patch, missing_ok=False)
            except KubeError as err:
                if err.status == 409:
                    continue
                raise
            break
        else:
            print(f"error: {args.name} kept changing; try again", file=sys.stderr)
            return 1
        output = _output(args)
        if output in ("json", "yaml"):
            _dump(kube.get_environment(args.name), output)
        else:
            print(f"previewenvironment.ephemera.dev/{args.name} {done(annotations)}")
        return 0
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        kube.close()


def keep(args: argparse.Namespace) -> int:
    return _annotate(args, lambda obj: {KEEP_ANNOTATION: "true"}, lambda _: "kept: it does not expire")


def unkeep(args: argparse.Namespace) -> int:
    return _annotate(args, lambda obj: {KEEP_ANNOTATION: None}, lambda _: "no longer kept: it expires as usual")


def current_expiry(obj: Obj) -> datetime.datetime | None:
    """The latest expiry known for the object: its annotation, or the operator's computed status.expiresAt."""
    known = [
        parse_time((obj["metadata"].get("annotations") or {}).get(EXPIRES_AT_ANNOTATION)),
        parse_time((obj.get("status") or {}).get("expiresAt")),
    ]
    found = [moment for moment in known if moment is not None]
    return max(found) if found else None


def extend(args: argparse.Namespace) -> int:
    try:
        duration = parse_duration(args.duration)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    def later(obj: Obj) -> Annotations:
        now = datetime.datetime.now(datetime.UTC)
        expiry = current_expiry(obj)
        start = now if expiry is None or expiry < now else expiry
        return {EXPIRES_AT_ANNOTATION: format_time(start + duration)}

    return _annotate(args, later, lambda done: f"extended: expires at {done[EXPIRES_AT_ANNOTATION]} at the earliest")


def jobs_run(args: argparse.Namespace) -> int:
    kube = _kube(args)
    try:
        return request_job(kube, args.namespace or "default", args)
    finally:
        kube.close()


def version(args: argparse.Namespace) -> int:
    output = _output(args)
    if output in ("json", "yaml"):
        _dump({"version": __version__}, output)
    else:
        print(f"ephemera {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # The common flags may come before or after the command; SUPPRESS keeps a subcommand's unset
    # copy from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="the kubeconfig context to use")
    common.add_argument("-o", "--output", choices=OUTPUTS, default=argparse.SUPPRESS, help="json, yaml or wide")
    parser = argparse.ArgumentParser(
        prog="kubectl ephemera", description="Ephemera's PreviewEnvironments, from kubectl.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", parents=[common], help="list PreviewEnvironments")
    listing.add_argument("--phase", help="only this phase (e.g. Ready, Failed)")
    listing.add_argument("--repository", help="only this repository (owner/name)")
    listing.set_defaults(func=list_environments)
    describing = commands.add_parser(
        "describe", parents=[common], help="status, conditions, Events and the records history"
    )
    describing.add_argument("name")
    describing.set_defaults(func=describe)
    retrying = commands.add_parser("retry", parents=[common], help="provision a Failed environment again")
    retrying.add_argument("name")
    retrying.set_defaults(func=retry)
    opening = commands.add_parser("open", parents=[common], help="print the environment's URL")
    opening.add_argument("name")
    opening.add_argument("--browser", action="store_true", help="also open it in a web browser")
    opening.set_defaults(func=open_url)
    keeping = commands.add_parser("keep", parents=[common], help="pin an environment: it never expires")
    keeping.add_argument("name")
    keeping.set_defaults(func=keep)
    unkeeping = commands.add_parser("unkeep", parents=[common], help="remove the pin; it expires as usual")
    unkeeping.add_argument("name")
    unkeeping.set_defaults(func=unkeep)
    extending = commands.add_parser(
        "extend", parents=[common], help="push the expiry later: max(now, current expiry) + DURATION"
    )
    extending.add_argument("name")
    extending.add_argument("duration", help="e.g. 2h, 3d, 1h30m")
    extending.set_defaults(func=extend)
    jobs = commands.add_parser("jobs", parents=[common], help="the operator's periodic jobs, run now")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    running = jobs_commands.add_parser(
        "run", parents=[common], help="ask the active operator replica to run a job now; prints its report"
    )
    add_job_arguments(running)
    running.set_defaults(func=jobs_run)
    commands.add_parser("version", parents=[common], help="print Ephemera's version").set_defaults(func=version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
