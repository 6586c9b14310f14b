"""The ``Host`` names an MLflow server on the head may answer to: ``mlflow server --allowed-hosts``
for cluster.yaml's basic-auth variant (MLflow opened beyond the head).

MLflow (>= 3.5; 3.17 here) refuses a request whose ``Host`` header is not allowed with 403 "Invalid
Host header - possible DNS rebinding attack detected" (``mlflow/server/security.py``). Without
``--allowed-hosts`` it allows localhost and the private address ranges only, so a client that
reaches the head by its public name or address (what opening port 5000 is for) is refused; with it,
only the names given are allowed (each compared with the whole header, ``name:port`` included, or
as a pattern with ``*``). This module lists the head's own names, each alone and with the port:

- loopback (``localhost``, ``127.0.0.1``, ``[::1]``): the driver on the head writes there;
- the machine's host name, its fully qualified name, and its addresses (those its name resolves to,
  and the one its default route leaves from);
- on EC2, the instance's public and private DNS names and addresses, from the instance metadata
  service (IMDSv2, 1 s; nothing elsewhere);
- ``$ABLATE_MLFLOW_HOSTS``: more names, comma-separated (a DNS alias, a load balancer's name).

    python3 -m orchestrator.mlflow_hosts --port 5000     # prints the comma-separated list
"""

from __future__ import annotations

import argparse
import os
import socket
import urllib.request

EXTRA_ENV = "ABLATE_MLFLOW_HOSTS"
IMDS = "http://169.254.169.254/latest"


def ec2_names(timeout: float = 1.0) -> list[str]:
    """The EC2 instance's public / private DNS names and addresses (IMDSv2); [] off EC2."""
    try:
        req = urllib.request.Request(f"{IMDS}/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            token = r.read().decode()
    except OSError:
        return []
    out = []
    for key in ("public-hostname", "public-ipv4", "local-hostname", "local-ipv4"):
        try:
            req = urllib.request.Request(f"{IMDS}/meta-data/{key}", headers={"X-aws-ec2-metadata-token": token})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                value = r.read().decode().strip()
        except OSError:
            continue
        out += [v for v in value.split() if v]
    return out


def machine_names() -> list[str]:
    """This machine's host name, fully qualified name and addresses."""
    names = [socket.gethostname(), socket.getfqdn()]
    for name in list(names):
        try:
            names += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:
            pass
    try:  # the address the default route leaves from (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            names.append(s.getsockname()[0])
    except OSError:
        pass
    return names


def allowed_hosts(port: int, metadata: bool = True) -> str:
    """``--allowed-hosts`` for a server on ``port``: every name alone and as ``name:port``."""
    names = ["localhost", "127.0.0.1", "[::1]"] + machine_names()
    if metadata:
        names += ec2_names()
    names += [n.strip() for n in os.environ.get(EXTRA_ENV, "").split(",") if n.strip()]
    out: dict[str, None] = {}
    for n in names:
        if ":" in n and not n.startswith("["):  # an IPv6 address, as a Host header writes it
            n = f"[{n}]"
        out[n] = None
        out[f"{n}:{port}"] = None
    return ",".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--no-metadata", action="store_true", help="do not ask EC2's instance metadata service")
    args = ap.parse_args(argv)
    print(allowed_hosts(args.port, metadata=not args.no_metadata))


if __name__ == "__main__":
    main()
