"""OPENSENSE_PUBLIC_URL left unset names the port the server binds: the links in mail
(sign-in, confirm, unsubscribe) and the report's verify link and QR code reach this
server, not the default 8080 (settings.py `local_url`, `Config.on_port`)."""

from __future__ import annotations

from opensense.settings import Config


def test_an_unset_public_url_follows_the_port() -> None:
    assert Config.from_env({}).public_url == "http://127.0.0.1:8080"
    assert Config.from_env({"OPENSENSE_PORT": "8765"}).public_url == "http://127.0.0.1:8765"
    # `serve --port`: the default follows; an explicit one is kept as given
    assert Config.from_env({}).on_port(9000).public_url == "http://127.0.0.1:9000"
    assert Config.from_env({"OPENSENSE_PORT": "8765"}).on_port(9000).port == 9000
    assert Config.from_env({"OPENSENSE_PORT": "8765"}).on_port(9000).public_url == (
        "http://127.0.0.1:9000"
    )


def test_a_public_url_given_is_kept_whatever_the_port() -> None:
    env = {"OPENSENSE_PORT": "8765", "OPENSENSE_PUBLIC_URL": "https://cold.example.com"}
    cfg = Config.from_env(env)
    assert cfg.public_url == "https://cold.example.com"
    assert cfg.on_port(9000).public_url == "https://cold.example.com"
