#!/usr/bin/env python3
"""Driver: ucloud-sdk-python3 (UHost key-pair actions, SHA1 signatures).

Pointed at keyfleet the documented way: `Client({"base_url": "http://127.0.0.1:PORT", ...})`.
Scenarios and output: see sdkcommon.py; `delete` takes KeyPairIds. The `ucloud` logger is raised
to WARNING: at INFO the SDK logs every response, PrivateKeyBody included.

  target/sdk/venv/bin/python scripts/sdk/ucloud.py --endpoint 127.0.0.1:18080 create web-1

What this SDK cannot do:
- stale-timestamp: UCloud requests carry no timestamp that is signed (the U-Timestamp-Ms header
  is not part of the signature), so there is nothing to make stale; the scenario prints
  {"unsupported": true}.
- replay: UCloud requests carry no nonce. The scenario sends the same signed CreateUHostKeyPair
  twice through the SDK's own transport to show what happens: the server cannot tell the copy
  from a new request (the second answer is whatever a second identical create gets, e.g. 8204).
- bad-resource-group, duplicate/bad tags, too-many-tags, bad-key-pair-names: CreateUHostKeyPair
  has no such parameters; these cases print {"unsupported": true}.
- missing-name / missing-public-key: the SDK's request schema refuses a call without the
  required field (ValidationException, nothing sent), so these call `client.invoke(...)` — the
  SDK's own signing and transport — with the field left out.
"""

import logging
import os
import sys

import sdkcommon

# This file is called ucloud.py, so its own folder must leave the path before the SDK package
# of the same name is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from ucloud.client import Client  # noqa: E402
from ucloud.core import exc  # noqa: E402


class UCloud:
    def __init__(self, args):
        self.args = args
        self.public_key = args.public_key
        self.private_key = args.private_key
        # the SDK logs every response at INFO, PrivateKeyBody included; importing it set the
        # logger to INFO, so this comes after the import (the config's log_level is unused)
        logging.getLogger("ucloud").setLevel(logging.WARNING)

    def _client(self, region=None):
        return Client(
            {
                "region": region or self.args.region,
                "public_key": self.public_key,
                "private_key": self.private_key,
                "base_url": "http://" + self.args.endpoint,
                "timeout": 30,
            }
        ).uhost()

    def create(self, name, tags=(), resource_group=None, region=None):
        if tags or resource_group:
            raise sdkcommon.Unsupported("CreateUHostKeyPair has no tags or resource groups")
        c = self._client(region)
        if name is None:
            return 200, c.invoke("CreateUHostKeyPair", {})
        return 200, c.create_uhost_key_pair({"KeyPairName": name})

    def import_(self, name, public_key_body):
        c = self._client()
        if public_key_body is None:
            return 200, c.invoke("ImportUHostKeyPairs", {"KeyPairName": name})
        return 200, c.import_uhost_key_pairs({"KeyPairName": name, "PublicKeyBody": public_key_body})

    def describe(self, pattern):
        d = {"Limit": 100}
        if pattern:
            d["KeyPairName"] = pattern
        return 200, self._client().describe_uhost_key_pairs(d)

    def delete(self, key_pair_ids):
        return 200, self._client().delete_uhost_key_pairs({"KeyPairIds": list(key_pair_ids)})

    def delete_raw(self, _):
        raise sdkcommon.Unsupported("KeyPairIds.N is a list; there is no JSON string to get wrong")

    def describe_exception(self, e):
        if isinstance(e, exc.RetCodeException):
            return {"exception": "RetCodeException", "code": e.code, "message": e.message, "status": 200}
        if isinstance(e, exc.HTTPStatusException):
            return {"exception": "HTTPStatusException", "status": e.status_code, "message": str(e)}
        return {"message": str(e)}

    def use_wrong_secret(self):
        self.private_key = self.private_key + "-wrong"

    def use_unknown_key(self):
        self.public_key = "unknown-" + self.public_key

    def move_clock_back(self, minutes):
        raise sdkcommon.Unsupported("UCloud signs no timestamp; a request cannot be stale")

    def pin_nonce(self):
        # There is no nonce to pin: every signed UCloud request can be replayed as it is. From
        # now on one client signs one request and sends that same request for every call.
        client = self._client()
        client._build_http_request = _memoise(client._build_http_request)
        self._client = lambda region=None: client


def _memoise(build):
    """Build (and sign) the HTTP request once and hand the same request out every time."""
    cached = {}

    def once(args):
        if "req" not in cached:
            cached["req"] = build(args)
        return cached["req"]

    return once


if __name__ == "__main__":
    p = sdkcommon.parser(
        __doc__.splitlines()[0],
        {
            "region": "cn-bj2",
            "credentials": [
                ("--public-key", "UCLOUD_PUBLIC_KEY", "ucloudpub"),
                ("--private-key", "UCLOUD_PRIVATE_KEY", "ucloudpriv"),
            ],
        },
    )
    args = p.parse_args()
    if not args.endpoint:
        p.error("--endpoint host:port is required")
    if args.scenario == "error" and args.args and args.args[0] in (
        "bad-resource-group",
        "duplicate-tag-key",
        "bad-tag-key",
        "bad-tag-value",
        "too-many-tags",
        "bad-key-pair-names",
    ):
        sdkcommon.emit({"op": "error", "unsupported": True, "reason": "UCloud has no " + args.args[0]})
        sys.exit(0)
    if args.scenario == "error" and args.args and args.args[0] == "bad-name":
        # UCloud names are 1-63 letters, digits and ASCII symbols: a leading digit is fine, a
        # space is not.
        u = UCloud(args)
        sdkcommon.outcome(u, "create", lambda: u.create(name="bad name " + args.args[1]))
        sys.exit(0)
    sdkcommon.main(UCloud(args), args)
    sys.exit(0)
