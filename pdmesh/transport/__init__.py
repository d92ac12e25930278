"""KV transports between prefill and decode workers (see ``base`` for the contract)."""

from pdmesh.transport.base import BaseKVTransport, BaseTransfer, PreparedPull, TransferError, TransferState
from pdmesh.transport.grpc_transport import GrpcKVTransport
from pdmesh.transport.lease import LeaseTable
from pdmesh.transport.servicer import KVTransferServicer

__all__ = ["BaseKVTransport", "BaseTransfer", "PreparedPull", "TransferError", "TransferState", "GrpcKVTransport",
           "KVTransferServicer", "LeaseTable"]
