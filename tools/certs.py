"""``fabric-tool ca init`` and ``fabric-tool cert issue|issue-server|check``: the fabric CA and
certificates by hand, for tests, a first manual setup, and inspecting a ``--tls-dir``.

The bootstrap (issue 20 item 2: ``install`` keeps the CA in a Secret, ``join`` hands out a
bootstrap credential, agents send CSRs) is built on the same :mod:`fabric.control.pki`; these
commands are its manual counterpart. Each issued directory has the ``--tls-dir`` layout
(``tls.crt``, ``tls.key`` 0600, ``ca.crt``); the key is made here, next to the CA (the bootstrap
will have the holder make its own key and send a CSR instead).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from fabric.control import identity, pki

CA_EPILOG = """examples:
  fabric-tool ca init --dir /etc/kosmos-fabric/ca
  fabric-tool ca init --dir ./ca --days 365 --name "kosmos-fabric CA (staging)"
"""

CERT_EPILOG = """examples:
  fabric-tool cert issue node/east/e1 --ca-dir ./ca --out-dir ./e1-tls          an agent (24 h)
  fabric-tool cert issue tree/root-a --ca-dir ./ca --out-dir ./tree-tls --days 30
  fabric-tool cert issue reader/ops --ca-dir ./ca --out-dir ./status-tls        fabric-tool status
  fabric-tool cert issue mcs/clusterset --ca-dir ./ca --out-dir ./mcs-tls --days 30   kosmos-mcs
  fabric-tool cert issue relay/zone-a --ca-dir ./ca --out-dir ./relay-up-tls --days 30  fabric-relay
  fabric-tool cert issue-server --ca-dir ./ca --out-dir ./reflector-tls --ip 10.0.0.5 \\
      --dns kosmos-fabric-reflector.kosmos-system.svc
  fabric-tool cert check --tls-dir ./e1-tls                                     why it would be refused
then: fabric-agent --tls-dir ./e1-tls ...; fabric-reflector --tls-dir ./reflector-tls ...;
      fabric-tool status --reflector 10.0.0.5:4880 --tls-dir ./status-tls
"""


def _days(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < v <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r}: days must be more than 0 and at most 36500")
    return v


def _identity(text: str) -> identity.Identity:
    try:
        return identity.parse(text, "IDENTITY")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    ca = sub.add_parser("ca", help="the fabric CA (init)", epilog=CA_EPILOG, formatter_class=formatter)
    csub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    init = csub.add_parser("init", help="make a CA key (ca.key, 0600) and self-signed certificate (ca.crt) in DIR",
                           epilog=CA_EPILOG, formatter_class=formatter)  # fmt: skip
    init.add_argument("--dir", required=True, type=Path, help="directory for ca.key and ca.crt")
    init.add_argument("--days", type=_days, default=3650, help="lifetime in days (default 3650)")
    init.add_argument("--name", default="kosmos-fabric CA", help="the CA's common name")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every certificate it issued "
                      "stops being accepted once processes load the new ca.crt)")

    cert = sub.add_parser("cert", help="issue and check certificates of the fabric CA", epilog=CERT_EPILOG,
                          formatter_class=formatter)  # fmt: skip
    xsub = cert.add_subparsers(dest="cert_command", metavar="COMMAND", required=True)
    issue = xsub.add_parser("issue", help="a client certificate for IDENTITY (its one URI SAN), clientAuth",
                            epilog=CERT_EPILOG, formatter_class=formatter)  # fmt: skip
    issue.add_argument("identity", type=_identity, metavar="IDENTITY",
                       help="node/<cluster>/<node>, bootstrap/<cluster>, tree/<name>, scheduler/<name>, mcs/<name>, "
                       "relay/<name> (a fabric-relay, towards the reflector), reader/<name> or admin/<name>")
    issue.add_argument("--ca-dir", required=True, type=Path, help="the CA's directory (ca init)")
    issue.add_argument("--out-dir", required=True, type=Path, help="write tls.crt, tls.key, ca.crt here")
    issue.add_argument("--days", type=_days, default=1.0, help="lifetime in days (default 1: 24 hours)")
    srv = xsub.add_parser("issue-server", help="a reflector (or fabric-relay) server certificate, serverAuth",
                          epilog=CERT_EPILOG, formatter_class=formatter)
    srv.add_argument("--ca-dir", required=True, type=Path, help="the CA's directory (ca init)")
    srv.add_argument("--out-dir", required=True, type=Path, help="write tls.crt, tls.key, ca.crt here")
    srv.add_argument("--dns", action="append", default=[], metavar="NAME",
                     help=f"a DNS name clients dial (repeatable; {pki.SERVICE_NAME} and localhost are always in)")
    srv.add_argument("--ip", action="append", default=[], metavar="ADDR", help="an IP address clients dial "
                     "(repeatable)")  # fmt: skip
    srv.add_argument("--days", type=_days, default=90.0, help="lifetime in days (default 90)")
    chk = xsub.add_parser("check", help="say whether a --tls-dir's certificate is acceptable, and why not",
                          epilog=CERT_EPILOG, formatter_class=formatter)  # fmt: skip
    chk.add_argument("--tls-dir", required=True, type=Path, help="a directory with tls.crt and ca.crt")
    chk.add_argument("--usage", choices=("client", "server"), default="client", help="default client")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "ca":
            return _ca_init(args)
        if args.cert_command == "check":
            return _check(args)
        ca = pki.CA.load(args.ca_dir)
        key = pki.new_key()
        if args.cert_command == "issue":
            cert = ca.sign_client(args.identity, pki.make_csr(key, args.identity),
                                  lifetime=datetime.timedelta(days=args.days))  # fmt: skip
        else:
            cert = ca.sign_server(key.public_key(), dns_names=args.dns, ips=args.ip,
                                  lifetime=datetime.timedelta(days=args.days))  # fmt: skip
        pki.write_tls_dir(args.out_dir, key, cert, ca.cert)
    except (pki.PKIError, OSError) as e:
        print(f"fabric-tool: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out_dir}: {pki.describe(cert)}, valid until {cert.not_valid_after:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    if (args.dir / pki.CA_KEY_FILE).exists() and not args.force:
        print(f"fabric-tool: error: {args.dir / pki.CA_KEY_FILE} exists; pass --force to replace the CA",
              file=sys.stderr)  # fmt: skip
        return 1
    ca = pki.make_ca(args.name, lifetime=datetime.timedelta(days=args.days))
    ca.save(args.dir)
    print(f"{args.dir}: {pki.describe(ca.cert)}, valid until {ca.cert.not_valid_after:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        cert = (args.tls_dir / pki.CERT_FILE).read_bytes()
        ca = (args.tls_dir / pki.CA_FILE).read_bytes()
    except OSError as e:
        print(f"fabric-tool: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    why = pki.explain(cert, ca, args.usage)
    if why is not None:
        print(f"{args.tls_dir / pki.CERT_FILE}: {why}")
        return 1
    print(f"{args.tls_dir / pki.CERT_FILE}: acceptable as a {args.usage} certificate")
    return 0
