"""KV transports between prefill and decode workers."""

from pdmesh.transport.base import BaseKVTransport, TransferError, TransferResult
from pdmesh.transport.grpc_transport import GrpcKVTransport, KVTransferServicer
from pdmesh.transport.lease import LeaseTable

__all__ = ["BaseKVTransport", "TransferError", "TransferResult", "GrpcKVTransport", "KVTransferServicer", "LeaseTable"]
