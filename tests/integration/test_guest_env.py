"""What a VM is told about the way out: the gateway as its proxy unless the operator overrides it, and where
an API base-URL override (PROVIDER_API_BASE_URLS) is reached — directly only when it is a guest forward,
otherwise through the gateway, whose allow-list then takes its host for that provider."""

from __future__ import annotations

from pathlib import Path

from polydev.services import build_egress, egress_hosts, open_services
from tests.support.app import make_settings


def test_an_override_host_joins_its_providers_allow_list() -> None:
    hosts = {"run": ("api.example.com",), "login": ("auth.example.com", "llm.internal.test")}
    assert egress_hosts(hosts, None) == hosts
    assert egress_hosts(hosts, "https://llm.internal.test/v1") == {
        "run": ("api.example.com", "llm.internal.test"), "login": ("auth.example.com", "llm.internal.test")}


async def test_overrides_go_through_the_gateway_unless_forwarded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, vm_guest_forwards="10.0.2.101:80=127.0.0.1:9",
                             provider_api_base_urls={"codex": "https://api.openai.com",
                                                     "claude_code": "http://10.0.2.101"})
    services = await open_services(settings)
    try:
        services.egress = build_egress(services)  # (as the engine's start does on a machine that runs VMs)
        codex, claude, gemini = (services.guest_env(p) for p in ("codex", "claude_code", "gemini_cli"))
        for env in (codex, claude, gemini):
            assert env.https_proxy == f"http://{settings.egress_guest_address}"
        assert "api.openai.com" not in codex.no_proxy.split(",")  # through the gateway
        assert "10.0.2.101" in claude.no_proxy.split(",")  # the forward, directly
        assert gemini.api_base_url is None and "10.0.2.101" not in gemini.no_proxy.split(",")
        services.egress.gateway.policy.check_name("codex", "run", "api.openai.com", 443)  # no Refused
    finally:
        await services.close()
