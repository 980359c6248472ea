from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChecksumAlgo(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_ALGO_UNSPECIFIED: _ClassVar[ChecksumAlgo]
    CHECKSUM_ALGO_NONE: _ClassVar[ChecksumAlgo]
    CHECKSUM_ALGO_CRC32: _ClassVar[ChecksumAlgo]
CHECKSUM_ALGO_UNSPECIFIED: ChecksumAlgo
CHECKSUM_ALGO_NONE: ChecksumAlgo
CHECKSUM_ALGO_CRC32: ChecksumAlgo

class KVLayout(_message.Message):
    __slots__ = ("kind", "num_layers", "dtype", "token_shape", "block_nbytes", "num_mtp_layers")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_MTP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    num_layers: int
    dtype: str
    token_shape: _containers.RepeatedScalarFieldContainer[int]
    block_nbytes: int
    num_mtp_layers: int
    def __init__(self, kind: _Optional[str] = ..., num_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., token_shape: _Optional[_Iterable[int]] = ..., block_nbytes: _Optional[int] = ..., num_mtp_layers: _Optional[int] = ...) -> None: ...

class BlockRef(_message.Message):
    __slots__ = ("key", "num_tokens", "checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: str
    num_tokens: int
    checksum: int
    def __init__(self, key: _Optional[str] = ..., num_tokens: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class KVManifest(_message.Message):
    __slots__ = ("version", "request_id", "model_fingerprint", "block_size", "tp_rank", "tp_size", "layout", "blocks", "token_ids", "first_token", "num_computed_tokens", "num_cached_tokens", "checksum_algo")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGO_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    model_fingerprint: str
    block_size: int
    tp_rank: int
    tp_size: int
    layout: KVLayout
    blocks: _containers.RepeatedCompositeFieldContainer[BlockRef]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    num_computed_tokens: int
    num_cached_tokens: int
    checksum_algo: ChecksumAlgo
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., block_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[BlockRef, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., checksum_algo: _Optional[_Union[ChecksumAlgo, str]] = ...) -> None: ...

class KVHandoff(_message.Message):
    __slots__ = ("ranks",)
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[KVManifest]
    def __init__(self, ranks: _Optional[_Iterable[_Union[KVManifest, _Mapping]]] = ...) -> None: ...
