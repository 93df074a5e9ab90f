from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AggKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGG_UNSPECIFIED: _ClassVar[AggKind]
    COUNT_ROWS: _ClassVar[AggKind]
    COUNT: _ClassVar[AggKind]
    SUM: _ClassVar[AggKind]
    SUM_SQUARES: _ClassVar[AggKind]
    MIN: _ClassVar[AggKind]
    MAX: _ClassVar[AggKind]
AGG_UNSPECIFIED: AggKind
COUNT_ROWS: AggKind
COUNT: AggKind
SUM: AggKind
SUM_SQUARES: AggKind
MIN: AggKind
MAX: AggKind

class CatalogRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "type", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Domain(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "tier", "columns", "row_count_bucket", "privacy_unit", "public_domains", "description", "min_count", "round_to", "bounds", "max_rows_per_unit", "quality", "pivots", "shared", "copy_of", "content_sha256", "unit_level", "cell_key")
    class PublicDomainsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Domain
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Domain, _Mapping]] = ...) -> None: ...
    class BoundsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Bounds
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Bounds, _Mapping]] = ...) -> None: ...
    class PivotsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_BUCKET_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_DOMAINS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PIVOTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    COPY_OF_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    UNIT_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CELL_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: str
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    row_count_bucket: str
    privacy_unit: str
    public_domains: _containers.MessageMap[str, Domain]
    description: str
    min_count: int
    round_to: int
    bounds: _containers.MessageMap[str, Bounds]
    max_rows_per_unit: int
    quality: Quality
    pivots: _containers.ScalarMap[str, str]
    shared: bool
    copy_of: str
    content_sha256: str
    unit_level: str
    cell_key: CellKey
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., row_count_bucket: _Optional[str] = ..., privacy_unit: _Optional[str] = ..., public_domains: _Optional[_Mapping[str, Domain]] = ..., description: _Optional[str] = ..., min_count: _Optional[int] = ..., round_to: _Optional[int] = ..., bounds: _Optional[_Mapping[str, Bounds]] = ..., max_rows_per_unit: _Optional[int] = ..., quality: _Optional[_Union[Quality, _Mapping]] = ..., pivots: _Optional[_Mapping[str, str]] = ..., shared: bool = ..., copy_of: _Optional[str] = ..., content_sha256: _Optional[str] = ..., unit_level: _Optional[str] = ..., cell_key: _Optional[_Union[CellKey, _Mapping]] = ...) -> None: ...

class CellKey(_message.Message):
    __slots__ = ("perturbed", "max_perturbation", "variance", "magnitude")
    PERTURBED_FIELD_NUMBER: _ClassVar[int]
    MAX_PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    MAGNITUDE_FIELD_NUMBER: _ClassVar[int]
    perturbed: bool
    max_perturbation: float
    variance: float
    magnitude: float
    def __init__(self, perturbed: bool = ..., max_perturbation: _Optional[float] = ..., variance: _Optional[float] = ..., magnitude: _Optional[float] = ...) -> None: ...

class Quality(_message.Message):
    __slots__ = ("score", "completeness_pct", "validity_pct", "uniqueness_pct", "uniqueness_in_score", "column_completeness_pct", "checks", "units_bucket", "source_modified_at", "ingested_at", "coarsened")
    class ColumnCompletenessPctEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_PCT_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_PCT_FIELD_NUMBER: _ClassVar[int]
    UNIQUENESS_PCT_FIELD_NUMBER: _ClassVar[int]
    UNIQUENESS_IN_SCORE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_COMPLETENESS_PCT_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    UNITS_BUCKET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    INGESTED_AT_FIELD_NUMBER: _ClassVar[int]
    COARSENED_FIELD_NUMBER: _ClassVar[int]
    score: int
    completeness_pct: float
    validity_pct: float
    uniqueness_pct: float
    uniqueness_in_score: bool
    column_completeness_pct: _containers.ScalarMap[str, float]
    checks: _containers.RepeatedCompositeFieldContainer[QualityCheck]
    units_bucket: str
    source_modified_at: str
    ingested_at: str
    coarsened: bool
    def __init__(self, score: _Optional[int] = ..., completeness_pct: _Optional[float] = ..., validity_pct: _Optional[float] = ..., uniqueness_pct: _Optional[float] = ..., uniqueness_in_score: bool = ..., column_completeness_pct: _Optional[_Mapping[str, float]] = ..., checks: _Optional[_Iterable[_Union[QualityCheck, _Mapping]]] = ..., units_bucket: _Optional[str] = ..., source_modified_at: _Optional[str] = ..., ingested_at: _Optional[str] = ..., coarsened: bool = ...) -> None: ...

class QualityCheck(_message.Message):
    __slots__ = ("column", "rule", "valid_pct", "invalid")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    VALID_PCT_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    column: str
    rule: str
    valid_pct: float
    invalid: str
    def __init__(self, column: _Optional[str] = ..., rule: _Optional[str] = ..., valid_pct: _Optional[float] = ..., invalid: _Optional[str] = ...) -> None: ...

class Bounds(_message.Message):
    __slots__ = ("lower", "upper")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    lower: float
    upper: float
    def __init__(self, lower: _Optional[float] = ..., upper: _Optional[float] = ...) -> None: ...

class Catalog(_message.Message):
    __slots__ = ("node_id", "tables", "accepts_references", "receipt_public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_REFERENCES_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    accepts_references: bool
    receipt_public_key: str
    def __init__(self, node_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., accepts_references: bool = ..., receipt_public_key: _Optional[str] = ...) -> None: ...

class ReferenceRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class ReferenceTable(_message.Message):
    __slots__ = ("info", "origin", "arrow_ipc")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    info: TableInfo
    origin: str
    arrow_ipc: bytes
    def __init__(self, info: _Optional[_Union[TableInfo, _Mapping]] = ..., origin: _Optional[str] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class ReferenceAck(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: TableInfo
    def __init__(self, info: _Optional[_Union[TableInfo, _Mapping]] = ...) -> None: ...

class Expr(_message.Message):
    __slots__ = ("column", "literal", "call")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    LITERAL_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    column: ColumnRef
    literal: Literal
    call: Call
    def __init__(self, column: _Optional[_Union[ColumnRef, _Mapping]] = ..., literal: _Optional[_Union[Literal, _Mapping]] = ..., call: _Optional[_Union[Call, _Mapping]] = ...) -> None: ...

class ColumnRef(_message.Message):
    __slots__ = ("table", "name")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    table: str
    name: str
    def __init__(self, table: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Literal(_message.Message):
    __slots__ = ("is_null", "bool_value", "int_value", "float_value", "string_value")
    IS_NULL_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    is_null: bool
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    def __init__(self, is_null: bool = ..., bool_value: bool = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ...) -> None: ...

class Call(_message.Message):
    __slots__ = ("op", "args")
    OP_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    op: str
    args: _containers.RepeatedCompositeFieldContainer[Expr]
    def __init__(self, op: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Expr, _Mapping]]] = ...) -> None: ...

class TableRef(_message.Message):
    __slots__ = ("table", "alias")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    table: str
    alias: str
    def __init__(self, table: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("table", "kind", "on")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ON_FIELD_NUMBER: _ClassVar[int]
    table: TableRef
    kind: str
    on: Expr
    def __init__(self, table: _Optional[_Union[TableRef, _Mapping]] = ..., kind: _Optional[str] = ..., on: _Optional[_Union[Expr, _Mapping]] = ...) -> None: ...

class Aggregate(_message.Message):
    __slots__ = ("name", "kind", "arg")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARG_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: AggKind
    arg: Expr
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[AggKind, str]] = ..., arg: _Optional[_Union[Expr, _Mapping]] = ...) -> None: ...

class NamedExpr(_message.Message):
    __slots__ = ("name", "expr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPR_FIELD_NUMBER: _ClassVar[int]
    name: str
    expr: Expr
    def __init__(self, name: _Optional[str] = ..., expr: _Optional[_Union[Expr, _Mapping]] = ...) -> None: ...

class OrderKey(_message.Message):
    __slots__ = ("name", "descending")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    descending: bool
    def __init__(self, name: _Optional[str] = ..., descending: bool = ...) -> None: ...

class RowsSpec(_message.Message):
    __slots__ = ("columns", "order_by", "limit")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[NamedExpr]
    order_by: _containers.RepeatedCompositeFieldContainer[OrderKey]
    limit: int
    def __init__(self, columns: _Optional[_Iterable[_Union[NamedExpr, _Mapping]]] = ..., order_by: _Optional[_Iterable[_Union[OrderKey, _Mapping]]] = ..., limit: _Optional[int] = ...) -> None: ...

class PrivacyRequest(_message.Message):
    __slots__ = ("epsilon", "delta", "grant")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    grant: str
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., grant: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("request_id", "project", "researcher", "query_sha256", "source", "joins", "where", "group_by", "aggregates", "rows", "privacy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    RESEARCHER_FIELD_NUMBER: _ClassVar[int]
    QUERY_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    JOINS_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    project: str
    researcher: str
    query_sha256: str
    source: TableRef
    joins: _containers.RepeatedCompositeFieldContainer[Join]
    where: Expr
    group_by: _containers.RepeatedCompositeFieldContainer[NamedExpr]
    aggregates: _containers.RepeatedCompositeFieldContainer[Aggregate]
    rows: RowsSpec
    privacy: PrivacyRequest
    def __init__(self, request_id: _Optional[str] = ..., project: _Optional[str] = ..., researcher: _Optional[str] = ..., query_sha256: _Optional[str] = ..., source: _Optional[_Union[TableRef, _Mapping]] = ..., joins: _Optional[_Iterable[_Union[Join, _Mapping]]] = ..., where: _Optional[_Union[Expr, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[NamedExpr, _Mapping]]] = ..., aggregates: _Optional[_Iterable[_Union[Aggregate, _Mapping]]] = ..., rows: _Optional[_Union[RowsSpec, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyRequest, _Mapping]] = ...) -> None: ...

class PartialResult(_message.Message):
    __slots__ = ("node_id", "arrow_ipc", "suppressed_cells", "hidden_cells", "tier", "min_count", "round_to", "epsilon_spent", "delta_spent", "noise_scales", "replayed", "perturbed", "receipt_statement", "receipt_salt")
    class NoiseScalesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_CELLS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_CELLS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_SPENT_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    PERTURBED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SALT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    arrow_ipc: bytes
    suppressed_cells: int
    hidden_cells: int
    tier: str
    min_count: int
    round_to: int
    epsilon_spent: float
    delta_spent: float
    noise_scales: _containers.ScalarMap[str, float]
    replayed: bool
    perturbed: bool
    receipt_statement: str
    receipt_salt: bytes
    def __init__(self, node_id: _Optional[str] = ..., arrow_ipc: _Optional[bytes] = ..., suppressed_cells: _Optional[int] = ..., hidden_cells: _Optional[int] = ..., tier: _Optional[str] = ..., min_count: _Optional[int] = ..., round_to: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., delta_spent: _Optional[float] = ..., noise_scales: _Optional[_Mapping[str, float]] = ..., replayed: bool = ..., perturbed: bool = ..., receipt_statement: _Optional[str] = ..., receipt_salt: _Optional[bytes] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("checkpoint_seq", "checkpoint_hash")
    CHECKPOINT_SEQ_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_HASH_FIELD_NUMBER: _ClassVar[int]
    checkpoint_seq: int
    checkpoint_hash: str
    def __init__(self, checkpoint_seq: _Optional[int] = ..., checkpoint_hash: _Optional[str] = ...) -> None: ...

class AuditReport(_message.Message):
    __slots__ = ("ok", "entries", "first_bad_seq", "reason", "head_seq", "head_hash")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries: int
    first_bad_seq: int
    reason: str
    head_seq: int
    head_hash: str
    def __init__(self, ok: bool = ..., entries: _Optional[int] = ..., first_bad_seq: _Optional[int] = ..., reason: _Optional[str] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...

class AuditPageRequest(_message.Message):
    __slots__ = ("after_seq", "limit", "tail")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    limit: int
    tail: bool
    def __init__(self, after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., tail: bool = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("seq", "time", "actor", "project", "action", "detail_json", "prev_hash", "hash", "withheld")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: str
    actor: str
    project: str
    action: str
    detail_json: str
    prev_hash: str
    hash: str
    withheld: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[str] = ..., actor: _Optional[str] = ..., project: _Optional[str] = ..., action: _Optional[str] = ..., detail_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., withheld: _Optional[_Iterable[str]] = ...) -> None: ...

class AuditPage(_message.Message):
    __slots__ = ("entries", "head_seq", "head_hash")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    head_seq: int
    head_hash: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., head_seq: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...

class RowChunk(_message.Message):
    __slots__ = ("header", "arrow_ipc")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    header: PartialResult
    arrow_ipc: bytes
    def __init__(self, header: _Optional[_Union[PartialResult, _Mapping]] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node_id", "status", "version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    status: str
    version: str
    def __init__(self, node_id: _Optional[str] = ..., status: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
