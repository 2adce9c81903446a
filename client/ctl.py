"""`topoipamctl`: the admin CLI. Talks to etcd directly, calicoctl-style.

This module is the entry point: it parses the arguments
(:mod:`topoipam.client.ctl_parser`), connects to etcd and runs the verb's
handler — resources in :mod:`topoipam.client.ctl_resources`, ``ipam`` in
:mod:`topoipam.client.ctl_ipam`, ``explain`` and ``check`` in
:mod:`topoipam.client.ctl_reports`, printing in
:mod:`topoipam.client.ctl_output`. What a verb does lives in the daemon
package, usable from the library: writes in :mod:`topoipam.daemon.admin`
(every change one compare-and-swap transaction, re-read and re-validated
after a lost race, never half a manifest), reports in
:mod:`topoipam.daemon.audit` (one snapshot at one revision).

Exit status: 0 success; 1 an expected failure (one ``error: ...`` line on
stderr) or, for the ``check`` reports, problems found; 2 usage errors
(argparse); 141 (128 + SIGPIPE, what a shell shows for ``| head``) when
stdout is closed early, quietly. Reports (``ipam check``, ``check ...``)
print on stdout: problem lines, then ``warning: ...`` lines, then a summary;
warnings alone exit 0 unless ``--fail-on-warnings``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from topoipam.client.ctl_output import fail
from topoipam.client.ctl_parser import build_parser, usage_problem
from topoipam.daemon.core.errors import DatastoreUnavailable, InvalidInput, TopoipamError

# Named here too: code that drives the CLI in-process catches it as ctl.NoPoolForNode.
from topoipam.daemon.core.errors import NoPoolForNode as NoPoolForNode
from topoipam.daemon.etcd_access import read_password_file
from topoipam.daemon.store import EtcdOptions, EtcdStore

# 128 + SIGPIPE: the status a shell shows for a writer whose reader went away.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def etcd_options(args: argparse.Namespace) -> EtcdOptions:
    password = None
    if args.etcd_password_file:
        password = read_password_file(args.etcd_password_file, "etcd password file")
    if args.etcd_timeout <= 0:
        raise InvalidInput("--etcd-timeout must be positive")
    return EtcdOptions(
        endpoints=tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()),
        ca_file=args.etcd_ca or None,
        cert_file=args.etcd_cert or None,
        key_file=args.etcd_key or None,
        user=args.etcd_user or None,
        password=password,
        timeout=args.etcd_timeout,
    )


async def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; the in-process entry point (tests call this).

    Returns the exit code; usage errors raise SystemExit(2) like argparse.
    """
    args = build_parser().parse_args(argv)
    problem = usage_problem(args)
    if problem is not None:
        args.usage_parser.error(problem)
    if getattr(args, "local_handler", None):  # a verb that needs no etcd (install-cni)
        return int(args.local_handler(args))
    try:
        options = etcd_options(args)
        async with EtcdStore(options, args.prefix) as store:
            # Fail within the short timeout when etcd does not answer: some reads
            # below use the store's long timeout for big ranges.
            await store.ping()
            return int(await args.handler(store, args))
    except DatastoreUnavailable as exc:
        return fail(f"{exc} (etcd endpoints: {args.etcd_endpoints})")
    except TopoipamError as exc:
        return fail(str(exc))
    except BrokenPipeError:
        raise  # stdout went away: main() ends quietly
    except OSError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    # The store logs values it skips (corrupt, unknown); say so the way other warnings read.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        code = asyncio.run(run(argv))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # `topoipamctl ... | head -1`: the reader has what it wanted. End like a
        # writer killed by SIGPIPE would (status 141), without a message, and
        # point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
