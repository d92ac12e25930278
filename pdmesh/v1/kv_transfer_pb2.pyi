from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BeginReadRequest(_message.Message):
    __slots__ = ("request_id", "block_ids", "max_seconds", "stage", "lease_token", "num_tokens", "prompt_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    max_seconds: float
    stage: bool
    lease_token: str
    num_tokens: int
    prompt_hash: bytes
    def __init__(self, request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., max_seconds: _Optional[float] = ..., stage: _Optional[bool] = ..., lease_token: _Optional[str] = ..., num_tokens: _Optional[int] = ..., prompt_hash: _Optional[bytes] = ...) -> None: ...

class BeginReadResponse(_message.Message):
    __slots__ = ("read_id", "granted_seconds", "staged")
    READ_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    read_id: int
    granted_seconds: float
    staged: NixlStagedRegion
    def __init__(self, read_id: _Optional[int] = ..., granted_seconds: _Optional[float] = ..., staged: _Optional[_Union[NixlStagedRegion, _Mapping]] = ...) -> None: ...

class NixlStagedRegion(_message.Message):
    __slots__ = ("address", "num_blocks", "nbytes", "num_ranks")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    address: int
    num_blocks: int
    nbytes: int
    num_ranks: int
    def __init__(self, address: _Optional[int] = ..., num_blocks: _Optional[int] = ..., nbytes: _Optional[int] = ..., num_ranks: _Optional[int] = ...) -> None: ...

class EndReadRequest(_message.Message):
    __slots__ = ("request_id", "read_id", "lease_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    READ_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    read_id: int
    lease_token: str
    def __init__(self, request_id: _Optional[str] = ..., read_id: _Optional[int] = ..., lease_token: _Optional[str] = ...) -> None: ...

class EndReadResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class NixlMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NixlMetadata(_message.Message):
    __slots__ = ("agent_name", "agent_metadata", "incarnation", "mem_type", "device_id", "base_address", "num_layers", "blocks_per_layer", "block_bytes", "rank_base_addresses", "rank_device_ids", "staging_address", "staging_bytes")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_BASE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    RANK_DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    STAGING_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    agent_metadata: bytes
    incarnation: str
    mem_type: str
    device_id: int
    base_address: int
    num_layers: int
    blocks_per_layer: int
    block_bytes: int
    rank_base_addresses: _containers.RepeatedScalarFieldContainer[int]
    rank_device_ids: _containers.RepeatedScalarFieldContainer[int]
    staging_address: int
    staging_bytes: int
    def __init__(self, agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., incarnation: _Optional[str] = ..., mem_type: _Optional[str] = ..., device_id: _Optional[int] = ..., base_address: _Optional[int] = ..., num_layers: _Optional[int] = ..., blocks_per_layer: _Optional[int] = ..., block_bytes: _Optional[int] = ..., rank_base_addresses: _Optional[_Iterable[int]] = ..., rank_device_ids: _Optional[_Iterable[int]] = ..., staging_address: _Optional[int] = ..., staging_bytes: _Optional[int] = ...) -> None: ...

class IpcHandleRequest(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    def __init__(self, rank: _Optional[int] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("device", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "shape", "dtype", "incarnation")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    incarnation: str
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("request_id", "block_ids", "rank", "lease_token", "num_tokens", "prompt_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    rank: int
    lease_token: str
    num_tokens: int
    prompt_hash: bytes
    def __init__(self, request_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., rank: _Optional[int] = ..., lease_token: _Optional[str] = ..., num_tokens: _Optional[int] = ..., prompt_hash: _Optional[bytes] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("first_index", "num_blocks", "data")
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    first_index: int
    num_blocks: int
    data: bytes
    def __init__(self, first_index: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
