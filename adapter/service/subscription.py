"""The server's rest-hook Subscription that points at `serve`."""

from __future__ import annotations

import time
from typing import Any

from adapter.errors import AdapterError
from adapter.service.core import ServiceCore


class Subscriber(ServiceCore):
    def subscribe(self, token: str, timeout: float = 90.0) -> dict[str, Any]:
        """Create or update our Subscription for FNA Procedures and wait until the server activates it."""
        serve = self.settings.serve
        subscription = {
            "resourceType": "Subscription", "id": serve.subscription_id, "status": "requested",
            "reason": "fhir-charge-adapter: code FNA biopsy Procedures into charges",
            "criteria": f"Procedure?code={self.syncer.source.code_param}",
            "channel": {"type": "rest-hook", "endpoint": serve.endpoint, "payload": "application/fhir+json",
                        "header": [f"Authorization: Bearer {token}"]},
        }
        self.client.update(subscription)
        deadline = time.monotonic() + timeout
        while True:
            current = self.client.read("Subscription", serve.subscription_id)
            if current.get("status") == "active":
                return current
            if current.get("status") == "error" or time.monotonic() > deadline:
                raise AdapterError(f"Subscription/{serve.subscription_id} is {current.get('status')!r}, not active"
                                   f"{' after ' + str(int(timeout)) + ' s' if current.get('status') != 'error' else ''}"
                                   f": {current.get('error', '')}")
            time.sleep(1.0)

