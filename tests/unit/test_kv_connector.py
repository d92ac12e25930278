"""The engine's KV connector (pure logic over the real block manager, exact block ids): a pull
that ends without its KV keeps its blocks until the transfer has certainly stopped writing."""

import time

from pdmesh.engine.connector import KVConnector, PullJob
from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.transport.base import BaseTransfer, PreparedPull, TransferState
from pdmesh.transport.loopback import LoopbackTransport
from pdmesh.v1 import common_pb2 as pb


class InFlight(BaseTransfer):
    """A transfer the test controls: RUNNING until ``finish``; ``cancel`` stops it only once
    ``stoppable`` (like a CUDA copy already queued)."""

    def __init__(self) -> None:
        self.state = TransferState.RUNNING
        self.stoppable = False
        self.cancels = 0

    def poll(self) -> TransferState:
        return self.state

    def cancel(self) -> bool:
        self.cancels += 1
        return self.stoppable or self.state is not TransferState.RUNNING


def setup(deadline_s: float = 60.0):
    blocks = PrefixCachingBlockManager(8, 4)
    assert blocks.allocate("r", 12) == [0, 1, 2]
    conn = KVConnector(blocks)
    stopped, outcomes = [], []
    job = PullJob("r", LoopbackTransport({}), PreparedPull(pb.KVDescriptor(), [5, 6, 7], time.monotonic() + deadline_s), 0,
                  on_stopped=lambda: stopped.append("r"), on_outcome=outcomes.append)
    xfer = InFlight()
    conn.add(job, xfer, 3, time.monotonic())
    return blocks, conn, xfer, stopped


def test_abort_quarantines_blocks_until_the_copy_stops():
    blocks, conn, xfer, stopped = setup()
    assert conn.poll() == [] and conn.pending
    assert conn.abort("r") is not None
    assert not blocks.has_request("r") and blocks.num_free_blocks == 5 and stopped == []
    assert conn.quarantined_blocks() == 3 and len(conn.stopping) == 1
    assert blocks.allocate("s", 12) == [3, 4, 5]  # the next request never gets blocks still written
    conn.poll()
    assert stopped == [] and blocks.num_free_blocks == 2
    xfer.stoppable = True  # the copy has run
    assert conn.poll() == []
    assert stopped == ["r"] and not conn.pending and blocks.num_free_blocks == 5
    assert blocks.allocate("t", 12) == [0, 1, 2]
    blocks.check_invariants()


def test_a_stoppable_transfer_frees_at_once_and_timeouts_fail():
    blocks, conn, xfer, stopped = setup(deadline_s=-1.0)
    xfer.stoppable = True
    ended = conn.poll()
    assert len(ended) == 1 and "timed out" in ended[0][1]
    assert stopped == ["r"] and not conn.stopping
    assert blocks.has_request("r")  # the engine settles the request's own blocks (recompute or free)


def test_done_after_the_deadline_is_not_trusted():
    blocks, conn, xfer, stopped = setup(deadline_s=-1.0)
    xfer.state = TransferState.DONE
    (entry, err), = conn.poll()
    assert "after its deadline" in err and stopped == ["r"]


def test_done_in_time_reports_no_error():
    blocks, conn, xfer, stopped = setup()
    xfer.state = TransferState.DONE
    (entry, err), = conn.poll()
    assert err is None and entry.blocks == 3 and stopped == ["r"] and not conn.pending
