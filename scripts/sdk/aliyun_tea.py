#!/usr/bin/env python3
"""Driver: alibabacloud-ecs20140526 (Tea / Darabonba; ACS3-HMAC-SHA256 by default, --v2 for RPC HMAC-SHA1).

Pointed at keyfleet the documented way: `Config(endpoint="127.0.0.1:PORT", protocol="http")`,
plus `config.signature_algorithm = "v2"` with --v2. Tea never adds RegionId itself; the request
models carry it. Scenarios and output: see sdkcommon.py.

  target/sdk/venv/bin/python scripts/sdk/aliyun_tea.py --endpoint 127.0.0.1:18080 [--v2] create web-1

How the gateway scenarios are done with this SDK:
- stale-timestamp: alibabacloud_tea_openapi.utils.Utils.get_timestamp (the RPC Timestamp and the
  ACS3 x-acs-date) is replaced by one that answers 20 minutes ago.
- replay: Utils.get_nonce (SignatureNonce / x-acs-signature-nonce) is replaced by a constant.
"""

import datetime
import sys
import uuid

import sdkcommon
from alibabacloud_ecs20140526 import models
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi import exceptions as tea_exceptions
from alibabacloud_tea_openapi import utils_models
from alibabacloud_tea_openapi.utils import Utils
from darabonba.runtime import RuntimeOptions


class Tea:
    def __init__(self, args):
        self.args = args
        self.ak = args.access_key_id
        self.secret = args.access_key_secret

    def _client(self):
        config = utils_models.Config(
            access_key_id=self.ak,
            access_key_secret=self.secret,
            endpoint=self.args.endpoint,
            protocol="http",
            read_timeout=30000,
            connect_timeout=10000,
        )
        if self.args.v2:
            config.signature_algorithm = "v2"
        return Client(config)

    @staticmethod
    def _answer(resp):
        return resp.status_code, resp.body.to_map()

    def create(self, name, tags=(), resource_group=None, region=None):
        req = models.CreateKeyPairRequest(
            region_id=region or self.args.region,
            key_pair_name=name,
            resource_group_id=resource_group,
            tag=[models.CreateKeyPairRequestTag(key=k, value=v) for k, v in tags] or None,
        )
        return self._answer(self._client().create_key_pair_with_options(req, RuntimeOptions()))

    def import_(self, name, public_key_body):
        req = models.ImportKeyPairRequest(
            region_id=self.args.region, key_pair_name=name, public_key_body=public_key_body
        )
        return self._answer(self._client().import_key_pair_with_options(req, RuntimeOptions()))

    def describe(self, pattern):
        req = models.DescribeKeyPairsRequest(
            region_id=self.args.region, key_pair_name=pattern, page_size=50, include_public_key=True
        )
        return self._answer(self._client().describe_key_pairs_with_options(req, RuntimeOptions()))

    def delete(self, names):
        import json

        return self.delete_raw(json.dumps(names))

    def delete_raw(self, key_pair_names):
        req = models.DeleteKeyPairsRequest(region_id=self.args.region, key_pair_names=key_pair_names)
        return self._answer(self._client().delete_key_pairs_with_options(req, RuntimeOptions()))

    def describe_exception(self, e):
        if isinstance(e, tea_exceptions.AlibabaCloudException):
            return {
                "exception": type(e).__name__,
                "code": e.code,
                "status": e.status_code,
                "message": e.message,
                "request_id": e.request_id,
            }
        return {"message": str(e), "code": getattr(e, "code", None)}

    def use_wrong_secret(self):
        self.secret = self.secret + "-wrong"

    def use_unknown_key(self):
        self.ak = "unknown-" + self.ak

    def move_clock_back(self, minutes):
        def stale():
            t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes)
            return t.strftime("%Y-%m-%dT%H:%M:%SZ")

        Utils.get_timestamp = staticmethod(stale)

    def pin_nonce(self):
        nonce = uuid.uuid4().hex
        Utils.get_nonce = staticmethod(lambda: nonce)


if __name__ == "__main__":
    p = sdkcommon.parser(
        __doc__.splitlines()[0],
        {
            "region": "cn-hangzhou",
            "credentials": [
                ("--access-key-id", "ALIBABA_CLOUD_ACCESS_KEY_ID", "testid"),
                ("--access-key-secret", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret"),
            ],
            "extra": [("--v2", {"action": "store_true", "help": 'config.signature_algorithm = "v2"'})],
        },
    )
    args = p.parse_args()
    if not args.endpoint:
        p.error("--endpoint host:port is required")
    sdkcommon.main(Tea(args), args)
    sys.exit(0)
