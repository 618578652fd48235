"""The `ephemera` command: `operator`, `webhook`, `dashboard`, `db`, `environments` (`kubectl ephemera` is
ephemera/plugin.py)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ephemera import __version__, logs
from ephemera.config import Settings, get_settings

if TYPE_CHECKING:
    from ephemera.kube import Kube


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as err:
        problems = "; ".join(f"EPHEMERA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise SystemExit(f"invalid settings: {problems}") from err


def run_operator(args: argparse.Namespace) -> int:
    import kopf  # imported here: the webhook process never loads the operator

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    import ephemera.operator  # noqa: F401  (registers the handlers)

    # Replicas with equal priorities would all freeze: each picks its own unless told.
    priority = settings.peering_priority
    if priority is None:
        priority = secrets.randbelow(1_000_000) + 1
    # Chosen here rather than by kopf, so that the operator-wide jobs can find this replica's own
    # entry in the peering object (jobs.is_active). POD_ID wins, as in kopf.
    identity = os.environ.get("POD_ID") or f"ephemera@{socket.gethostname()}/{secrets.token_hex(4)}"
    kopf.run(
        clusterwide=True,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=priority,
        identity=identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str, not exported
        memo=kopf.Memo(identity=identity),
    )
    return 0


def run_webhook(args: argparse.Namespace) -> int:
    from ephemera.webhook import app

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    app.run(settings)
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from ephemera.dashboard import app

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    app.run(settings)
    return 0


def db_upgrade(args: argparse.Namespace) -> int:
    from ephemera.store.engine import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    print(f"records database at the newest schema ({safe_url(settings.database_url)})")
    return 0


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def environments_list(args: argparse.Namespace) -> int:
    from ephemera.store.engine import make_engine
    from ephemera.store.queries import list_environments

    async def query() -> list[Any]:
        engine = make_engine(_settings().database_url)
        try:
            return await list_environments(engine, phase=args.phase, repository=args.repository)
        finally:
            await engine.dispose()

    rows = asyncio.run(query())
    origins, notes = _origins(_settings())
    if args.output == "json":
        print(
            json.dumps(
                [
                    {**row.model_dump(mode="json"), "origin": origins.get(row.uid), "policy": notes.get(row.uid)}
                    for row in rows
                ],
                indent=2,
            )
        )
        return 0
    table = [("NAME", "REPOSITORY", "PR", "COMMIT", "PHASE", "NAMESPACE", "CREATED", "DESTROYED", "POLICY", "ORIGIN")]
    table += [
        (
            r.name,
            r.repository,
            str(r.pull_request),
            r.commit_sha[:7],
            r.phase,
            r.namespace or "-",
            _when(r.created_at),
            _when(r.destroyed_at),
            notes.get(r.uid) or "-",
            origins.get(r.uid) or "-",
        )
        for r in rows
    ]
    print_table(table)
    return 0


def _origins(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """Read from the live objects, by uid: who made each (`backstop`, when it repaired a lost event, or
    `webhook`), and what the lifecycle policy says of it (its place in the queue, its expiry). The
    records hold neither; both are left out (with a note) if the cluster cannot be reached."""
    from kubernetes.config import ConfigException

    from ephemera.api.naming import ORIGIN_ANNOTATION
    from ephemera.kube import Kube, KubeError, load_api_client
    from ephemera.ledger import note

    try:
        kube = Kube(load_api_client(settings.kubeconfig), request_timeout=10.0)
    except (ConfigException, OSError) as err:
        print(f"origin and policy not shown: no cluster configured ({err})", file=sys.stderr)
        return {}, {}
    try:
        objects = {obj["metadata"]["uid"]: obj for obj in kube.list_environments()}
    except KubeError as err:
        print(f"origin and policy not shown: {err}", file=sys.stderr)
        return {}, {}
    finally:
        kube.close()
    origins = {
        uid: (obj["metadata"].get("annotations") or {}).get(ORIGIN_ANNOTATION, "webhook")
        for uid, obj in objects.items()
    }
    return origins, {uid: note(obj) for uid, obj in objects.items()}


def backstop_run(args: argparse.Namespace) -> int:
    """One backstop pass now, as the operator makes every EPHEMERA_PR_RESYNC_INTERVAL."""
    from ephemera.backstop import Backstop
    from ephemera.kube import Kube, KubeError, load_api_client

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    kube = Kube(load_api_client(settings.kubeconfig))
    try:
        report = Backstop(settings, kube).run()
    except KubeError as err:
        print(f"backstop pass failed: {err}", file=sys.stderr)
        return 1
    finally:
        kube.close()
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.complete else 1


def print_table(table: Sequence[Sequence[str]], indent: str = "") -> None:
    """Rows as aligned columns (the first row is the heading), as kubectl prints them."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


async def read_history(database_url: str, name: str) -> list[tuple[Any, list[Any]]]:
    """Every environment ever called `name`, with its transitions, from the records database."""
    from ephemera.store.engine import make_engine
    from ephemera.store.queries import history

    engine = make_engine(database_url)
    try:
        return await history(engine, name)
    finally:
        await engine.dispose()


def history_data(found: list[tuple[Any, list[Any]]]) -> list[dict[str, Any]]:
    return [
        {**row.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in events]} for row, events in found
    ]


def print_history(found: list[tuple[Any, list[Any]]], indent: str = "") -> None:
    for row, events in found:
        print(f"{indent}{row.name} (uid {row.uid}) {row.repository}#{row.pull_request}, now {row.phase}")
        for event in events:
            change = f"{event.from_phase or '-':>12} -> {event.to_phase:<12}"
            print(f"{indent}  {_when(event.at)}  {change} {event.reason}: {event.message or ''}")


def environments_history(args: argparse.Namespace) -> int:
    found = asyncio.run(read_history(_settings().database_url, args.name))
    if not found:
        print(f"no records of an environment named {args.name}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(history_data(found), indent=2))
        return 0
    print_history(found)
    return 0


def request_retry(kube: Kube, name: str) -> int:
    """Ask the operator to provision `name` again (the retry annotation); an exit status."""
    from ephemera.api.naming import RETRY_ANNOTATION
    from ephemera.kube import KubeError

    try:
        if kube.get_environment(name) is None:
            print(f"no PreviewEnvironment named {name}", file=sys.stderr)
            return 1
        value = datetime.datetime.now(datetime.UTC).isoformat()
        kube.patch_environment(name, {"metadata": {"annotations": {RETRY_ANNOTATION: value}}}, missing_ok=False)
    except KubeError as err:
        print(f"could not ask for a retry: {err}", file=sys.stderr)
        return 1
    print(f"retry of {name} requested ({RETRY_ANNOTATION}={value})")
    return 0


def environments_retry(args: argparse.Namespace) -> int:
    from ephemera.kube import Kube, load_api_client

    kube = Kube(load_api_client(_settings().kubeconfig))
    try:
        return request_retry(kube, args.name)
    finally:
        kube.close()


def request_job(kube: Kube, namespace: str, args: argparse.Namespace) -> int:
    """Ask the active operator replica to run a job now, wait for its report and print it; an exit status."""
    from ephemera.durations import parse_duration
    from ephemera.kube import KubeError
    from ephemera.ondemand import JobRequest, submit, wait_report

    try:
        older_than = parse_duration(args.older_than).total_seconds() if args.older_than else None
        max_age = parse_duration(args.max_age).total_seconds() if args.max_age else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if older_than is not None and args.job != "purge":
        print("error: --older-than is for purge", file=sys.stderr)
        return 2
    if max_age is not None and args.job != "retry-failed":
        print("error: --max-age is for retry-failed", file=sys.stderr)
        return 2
    request = JobRequest.new(args.job, dry_run=args.dry_run, older_than=older_than, max_age=max_age)
    try:
        submit(kube, namespace, request)
        report = wait_report(kube, namespace, request, timeout=args.timeout)
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if report is None:
        print(
            f"error: no operator answered within {args.timeout:.0f} s (is one running, watching ConfigMap "
            f"{namespace}/ephemera-jobs?); the request was withdrawn",
            file=sys.stderr,
        )
        return 1
    output = getattr(args, "output", None)
    if output == "json":
        print(json.dumps(report, indent=2))
    elif output == "yaml":
        import yaml

        print(yaml.safe_dump(report, sort_keys=False), end="")
    else:
        print_job_report(report)
    return 0 if report.get("ok") else 1


def print_job_report(report: dict[str, Any]) -> None:
    dry = " (dry run: nothing changed)" if report.get("dryRun") else ""
    print(f"{report.get('job')} {report.get('id')} on {report.get('replica', '?')}{dry}")
    print(f"  started {report.get('startedAt', '-')}, finished {report.get('finishedAt', '-')}")
    if not report.get("ok"):
        print(f"  failed: {report.get('error')}")
        return
    result = report.get("result") or {}
    for key, value in result.items():
        if isinstance(value, list):
            print(f"  {key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"  {key}: {value}")


def jobs_run(args: argparse.Namespace) -> int:
    from ephemera.intake.tombstones import default_namespace
    from ephemera.kube import Kube, load_api_client

    settings = _settings()
    namespace = args.namespace or settings.backstop_namespace or settings.webhook_namespace or default_namespace()
    kube = Kube(load_api_client(settings.kubeconfig))
    try:
        return request_job(kube, namespace, args)
    finally:
        kube.close()


def add_job_arguments(run: argparse.ArgumentParser) -> None:
    """The arguments of `jobs run`, the same for `ephemera` and `kubectl ephemera`."""
    from ephemera.ondemand import JOBS

    run.add_argument("job", choices=JOBS, help="the stale sweep, the records purge, or retries of failures")
    run.add_argument("--older-than", help="purge: records of environments destroyed longer ago than this (14d)")
    run.add_argument("--max-age", help="retry-failed: failures younger than this (2h)")
    run.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the report (600)")
    run.add_argument(
        "--namespace", "-n", help="the release's namespace, where the operator watches ConfigMap ephemera-jobs"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ephemera", description="Preview environments for GitHub pull requests.")
    parser.add_argument("--version", action="version", version=f"ephemera {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("operator", help="run the kopf operator").set_defaults(func=run_operator)
    commands.add_parser("webhook", help="run the GitHub webhook receiver").set_defaults(func=run_webhook)
    commands.add_parser(
        "dashboard", help="run the read-only dashboard page (environments, history, totals)"
    ).set_defaults(func=run_dashboard)

    db = commands.add_parser("db", help="the records database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply the schema migrations").set_defaults(func=db_upgrade)

    envs = commands.add_parser("environments", aliases=["env"], help="environments, from the records")
    env_commands = envs.add_subparsers(dest="env_command", required=True)
    listing = env_commands.add_parser("list", help="list environments, destroyed ones included")
    listing.add_argument("--phase", help="only this phase (e.g. Ready, Failed, Destroyed)")
    listing.add_argument("--repository", help="only this repository (owner/name)")
    listing.add_argument("--output", "-o", choices=["table", "json"], default="table")
    listing.set_defaults(func=environments_list)
    hist = env_commands.add_parser("history", help="every transition of one environment")
    hist.add_argument("name")
    hist.add_argument("--output", "-o", choices=["table", "json"], default="table")
    hist.set_defaults(func=environments_history)
    retry = env_commands.add_parser("retry", help="ask the operator to provision a Failed environment again")
    retry.add_argument("name")
    retry.set_defaults(func=environments_retry)
    backstop = commands.add_parser("backstop", help="the cluster converges on GitHub's open PRs")
    backstop_commands = backstop.add_subparsers(dest="backstop_command", required=True)
    backstop_commands.add_parser(
        "run", help="one pass now: environments for open PRs, teardowns for closed ones, failed deliveries redelivered"
    ).set_defaults(func=backstop_run)
    jobs = commands.add_parser("jobs", help="the operator's periodic jobs, run now")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    run = jobs_commands.add_parser(
        "run", help="ask the active operator replica to run a job now, and print its report when it is done"
    )
    add_job_arguments(run)
    run.add_argument("--output", "-o", choices=["table", "json"], default="table")
    run.set_defaults(func=jobs_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
