"""How long `ratchet up` waits before restarting a part that exited: doubling, then capped."""

from ratchet.cli.up import RestartPolicy


def test_the_restart_delay_doubles_up_to_its_cap() -> None:
    delays = [RestartPolicy().delay(exits) for exits in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
