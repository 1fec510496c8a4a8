"""The NATS address setting: one URL or a cluster's list, credentials kept out of the servers."""

from __future__ import annotations

import pytest

from events.relay.servers import connect_options, server_urls, user_of, where


def test_one_url_gives_one_server_and_its_credentials_as_options() -> None:
    assert connect_options("nats://operator:s3cret@127.0.0.1:4222") == {
        "servers": ["nats://127.0.0.1:4222"], "user": "operator", "password": "s3cret"}


def test_a_cluster_list_takes_the_first_credentials_for_every_server() -> None:
    options = connect_options(
        "nats://operator:pw@n1:4222, nats://n2:4223,nats://other:x@n3")
    # The announced servers have no credentials in their URLs either: the options cover them.
    assert options == {"servers": ["nats://n1:4222", "nats://n2:4223", "nats://n3:4222"],
                       "user": "operator", "password": "pw"}
    assert where("nats://operator:pw@n1:4222,n2:4223") == "n1:4222,n2:4223"
    assert user_of(["nats://n1", "nats://subscriber:pw@n2"]) == "subscriber"


def test_percent_encoded_passwords_are_decoded_and_a_bare_user_is_a_token() -> None:
    assert connect_options("nats://op:p%40ss%2Cw@h:1")["password"] == "p@ss,w"
    assert connect_options("nats://t0ken@h:1") == {"servers": ["nats://h:1"], "token": "t0ken"}
    assert connect_options("127.0.0.1:4222") == {"servers": ["nats://127.0.0.1:4222"]}


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(ValueError, match="no NATS server"):
        server_urls(" , ")
