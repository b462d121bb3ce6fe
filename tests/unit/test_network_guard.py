"""The tests run offline: outbound connections are refused at once (loopback is allowed), and a Hub call fails fast."""

import socket
import threading
import time

import pytest


def test_an_outbound_connection_is_refused_at_once():
    start = time.perf_counter()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="the tests run offline"):
        sock.connect(("93.184.215.14", 443))
    assert time.perf_counter() - start < 1


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        accepting = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        accepting.start()
        with socket.socket() as client:
            client.connect(server.getsockname())
        accepting.join(timeout=5)  # before the server socket closes under it


def test_a_hub_call_is_refused_rather_than_hanging(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as a learner online would call it
    start = time.perf_counter()
    with pytest.raises(Exception) as caught:
        huggingface_hub.HfApi().model_info("HuggingFaceTB/SmolLM2-135M-Instruct", timeout=5)
    assert time.perf_counter() - start < 10
    assert "refused" in repr(caught.value).lower() or "connect" in repr(caught.value).lower()


def test_labkit_sees_the_hub_as_unreachable():
    from labkit import models

    start = time.perf_counter()
    assert models.hub_reachable() is False
    assert time.perf_counter() - start < 3


def test_probing_a_port_gets_an_error_number_and_mapped_loopback_is_loopback():
    import errno

    import kernel_guard

    with socket.socket() as sock:
        assert sock.connect_ex(("93.184.215.14", 443)) == errno.ECONNREFUSED
    assert kernel_guard._loopback("::ffff:127.0.0.1") and kernel_guard._loopback("0.0.0.0")
    assert not kernel_guard._loopback("::ffff:93.184.215.14") and not kernel_guard._loopback("huggingface.co")
