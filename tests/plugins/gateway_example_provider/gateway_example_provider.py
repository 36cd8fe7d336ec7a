"""An identity provider a team might ship as its own package.

It accepts signed tickets ``<subject>.<signature>`` where the signature is
the first 32 hex digits of HMAC-SHA256(secret, subject), the way a company
SSO might hand out short-lived tickets.  Installing this package is all it
takes: the gateway finds it through the ``gateway.plugins`` entry point.
"""

import hashlib
import hmac

from gateway import hookimpl
from gateway.api import STR, LoginResult, Option, Provider, Request, invalid_credentials, invalid_request


def sign(secret: str, subject: str) -> str:
    return hmac.new(secret.encode(), subject.encode(), hashlib.sha256).hexdigest()[:32]


class ExampleProvider(Provider):
    name = "example"
    options = [
        Option("secret", STR, None, "shared secret that signs tickets", secret=True, required=True),
        Option("display_name", STR, "Example SSO", "shown in the user's profile"),
    ]

    async def login(self, request: Request, body: dict) -> LoginResult:
        ticket = request.field(body, "ticket", str)
        subject, _, signature = ticket.rpartition(".")
        if not subject:
            raise invalid_request("field ticket must look like <subject>.<signature>")
        if not hmac.compare_digest(signature, sign(self.settings.secret, subject)):
            raise invalid_credentials("the ticket is not valid")
        user, _, created = await self.gateway.profiles.resolve_identity(
            self.name, subject, profile={"sso": self.settings.display_name, "sso_subject": subject})
        return LoginResult(user=user, created=created)


@hookimpl
def gateway_providers():
    return [ExampleProvider]
