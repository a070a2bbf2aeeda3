from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SaveAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAVE_ACTION_UNSPECIFIED: _ClassVar[SaveAction]
    SAVE_ACTION_SAVE: _ClassVar[SaveAction]
    SAVE_ACTION_SAVE_AND_APPLY: _ClassVar[SaveAction]
    SAVE_ACTION_SAVE_AND_FORCE_APPLY: _ClassVar[SaveAction]

class TunerMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUNER_MODE_UNSPECIFIED: _ClassVar[TunerMode]
    TUNER_MODE_POWER_TARGET: _ClassVar[TunerMode]
    TUNER_MODE_HASHRATE_TARGET: _ClassVar[TunerMode]

class TunerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUNER_STATE_UNSPECIFIED: _ClassVar[TunerState]
    TUNER_STATE_DISABLED: _ClassVar[TunerState]
    TUNER_STATE_STABLE: _ClassVar[TunerState]
    TUNER_STATE_TUNING: _ClassVar[TunerState]
    TUNER_STATE_ERROR: _ClassVar[TunerState]

class MinerBrand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MINER_BRAND_UNSPECIFIED: _ClassVar[MinerBrand]
    MINER_BRAND_ANTMINER: _ClassVar[MinerBrand]
    MINER_BRAND_WHATSMINER: _ClassVar[MinerBrand]

class MinerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MINER_STATUS_UNSPECIFIED: _ClassVar[MinerStatus]
    MINER_STATUS_NOT_STARTED: _ClassVar[MinerStatus]
    MINER_STATUS_NORMAL: _ClassVar[MinerStatus]
    MINER_STATUS_PAUSED: _ClassVar[MinerStatus]
    MINER_STATUS_SUSPENDED: _ClassVar[MinerStatus]
    MINER_STATUS_RESTRICTED: _ClassVar[MinerStatus]
SAVE_ACTION_UNSPECIFIED: SaveAction
SAVE_ACTION_SAVE: SaveAction
SAVE_ACTION_SAVE_AND_APPLY: SaveAction
SAVE_ACTION_SAVE_AND_FORCE_APPLY: SaveAction
TUNER_MODE_UNSPECIFIED: TunerMode
TUNER_MODE_POWER_TARGET: TunerMode
TUNER_MODE_HASHRATE_TARGET: TunerMode
TUNER_STATE_UNSPECIFIED: TunerState
TUNER_STATE_DISABLED: TunerState
TUNER_STATE_STABLE: TunerState
TUNER_STATE_TUNING: TunerState
TUNER_STATE_ERROR: TunerState
MINER_BRAND_UNSPECIFIED: MinerBrand
MINER_BRAND_ANTMINER: MinerBrand
MINER_BRAND_WHATSMINER: MinerBrand
MINER_STATUS_UNSPECIFIED: MinerStatus
MINER_STATUS_NOT_STARTED: MinerStatus
MINER_STATUS_NORMAL: MinerStatus
MINER_STATUS_PAUSED: MinerStatus
MINER_STATUS_SUSPENDED: MinerStatus
MINER_STATUS_RESTRICTED: MinerStatus

class Power(_message.Message):
    __slots__ = ("watt",)
    WATT_FIELD_NUMBER: _ClassVar[int]
    watt: int
    def __init__(self, watt: _Optional[int] = ...) -> None: ...

class GigaHashrate(_message.Message):
    __slots__ = ("gigahash_per_second",)
    GIGAHASH_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    gigahash_per_second: float
    def __init__(self, gigahash_per_second: _Optional[float] = ...) -> None: ...

class TeraHashrate(_message.Message):
    __slots__ = ("terahash_per_second",)
    TERAHASH_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    terahash_per_second: float
    def __init__(self, terahash_per_second: _Optional[float] = ...) -> None: ...

class PowerEfficiency(_message.Message):
    __slots__ = ("joule_per_terahash",)
    JOULE_PER_TERAHASH_FIELD_NUMBER: _ClassVar[int]
    joule_per_terahash: float
    def __init__(self, joule_per_terahash: _Optional[float] = ...) -> None: ...

class LoginRequest(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("token", "timeout_s")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    token: str
    timeout_s: int
    def __init__(self, token: _Optional[str] = ..., timeout_s: _Optional[int] = ...) -> None: ...

class PauseMiningRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseMiningResponse(_message.Message):
    __slots__ = ("already_paused",)
    ALREADY_PAUSED_FIELD_NUMBER: _ClassVar[int]
    already_paused: bool
    def __init__(self, already_paused: bool = ...) -> None: ...

class ResumeMiningRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeMiningResponse(_message.Message):
    __slots__ = ("already_mining",)
    ALREADY_MINING_FIELD_NUMBER: _ClassVar[int]
    already_mining: bool
    def __init__(self, already_mining: bool = ...) -> None: ...

class PowerTargetProfile(_message.Message):
    __slots__ = ("target", "measured_hashrate", "estimated_power_consumption")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MEASURED_HASHRATE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_POWER_CONSUMPTION_FIELD_NUMBER: _ClassVar[int]
    target: Power
    measured_hashrate: GigaHashrate
    estimated_power_consumption: Power
    def __init__(self, target: _Optional[_Union[Power, _Mapping]] = ..., measured_hashrate: _Optional[_Union[GigaHashrate, _Mapping]] = ..., estimated_power_consumption: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class HashrateTargetProfile(_message.Message):
    __slots__ = ("target", "measured_hashrate", "estimated_power_consumption")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MEASURED_HASHRATE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_POWER_CONSUMPTION_FIELD_NUMBER: _ClassVar[int]
    target: TeraHashrate
    measured_hashrate: GigaHashrate
    estimated_power_consumption: Power
    def __init__(self, target: _Optional[_Union[TeraHashrate, _Mapping]] = ..., measured_hashrate: _Optional[_Union[GigaHashrate, _Mapping]] = ..., estimated_power_consumption: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class PowerTargetModeState(_message.Message):
    __slots__ = ("profile", "current_target")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TARGET_FIELD_NUMBER: _ClassVar[int]
    profile: PowerTargetProfile
    current_target: Power
    def __init__(self, profile: _Optional[_Union[PowerTargetProfile, _Mapping]] = ..., current_target: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class HashrateTargetModeState(_message.Message):
    __slots__ = ("profile", "current_target")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TARGET_FIELD_NUMBER: _ClassVar[int]
    profile: HashrateTargetProfile
    current_target: TeraHashrate
    def __init__(self, profile: _Optional[_Union[HashrateTargetProfile, _Mapping]] = ..., current_target: _Optional[_Union[TeraHashrate, _Mapping]] = ...) -> None: ...

class GetTunerStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTunerStateResponse(_message.Message):
    __slots__ = ("overall_tuner_state", "power_target_mode_state", "hashrate_target_mode_state")
    OVERALL_TUNER_STATE_FIELD_NUMBER: _ClassVar[int]
    POWER_TARGET_MODE_STATE_FIELD_NUMBER: _ClassVar[int]
    HASHRATE_TARGET_MODE_STATE_FIELD_NUMBER: _ClassVar[int]
    overall_tuner_state: TunerState
    power_target_mode_state: PowerTargetModeState
    hashrate_target_mode_state: HashrateTargetModeState
    def __init__(self, overall_tuner_state: _Optional[_Union[TunerState, str]] = ..., power_target_mode_state: _Optional[_Union[PowerTargetModeState, _Mapping]] = ..., hashrate_target_mode_state: _Optional[_Union[HashrateTargetModeState, _Mapping]] = ...) -> None: ...

class SetPowerTargetRequest(_message.Message):
    __slots__ = ("save_action", "power_target")
    SAVE_ACTION_FIELD_NUMBER: _ClassVar[int]
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    save_action: SaveAction
    power_target: Power
    def __init__(self, save_action: _Optional[_Union[SaveAction, str]] = ..., power_target: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class SetPowerTargetResponse(_message.Message):
    __slots__ = ("power_target",)
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    power_target: Power
    def __init__(self, power_target: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class PowerTargetMode(_message.Message):
    __slots__ = ("power_target",)
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    power_target: Power
    def __init__(self, power_target: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class HashrateTargetMode(_message.Message):
    __slots__ = ("hashrate_target",)
    HASHRATE_TARGET_FIELD_NUMBER: _ClassVar[int]
    hashrate_target: TeraHashrate
    def __init__(self, hashrate_target: _Optional[_Union[TeraHashrate, _Mapping]] = ...) -> None: ...

class TunerPerformanceMode(_message.Message):
    __slots__ = ("power_target", "hashrate_target")
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    HASHRATE_TARGET_FIELD_NUMBER: _ClassVar[int]
    power_target: PowerTargetMode
    hashrate_target: HashrateTargetMode
    def __init__(self, power_target: _Optional[_Union[PowerTargetMode, _Mapping]] = ..., hashrate_target: _Optional[_Union[HashrateTargetMode, _Mapping]] = ...) -> None: ...

class PerformanceMode(_message.Message):
    __slots__ = ("tuner_mode",)
    TUNER_MODE_FIELD_NUMBER: _ClassVar[int]
    tuner_mode: TunerPerformanceMode
    def __init__(self, tuner_mode: _Optional[_Union[TunerPerformanceMode, _Mapping]] = ...) -> None: ...

class GetPerformanceModeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BooleanConstraint(_message.Message):
    __slots__ = ("default",)
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    default: bool
    def __init__(self, default: bool = ...) -> None: ...

class PowerConstraints(_message.Message):
    __slots__ = ("default", "min", "max")
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    default: Power
    min: Power
    max: Power
    def __init__(self, default: _Optional[_Union[Power, _Mapping]] = ..., min: _Optional[_Union[Power, _Mapping]] = ..., max: _Optional[_Union[Power, _Mapping]] = ...) -> None: ...

class HashrateConstraints(_message.Message):
    __slots__ = ("default", "min", "max")
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    default: TeraHashrate
    min: TeraHashrate
    max: TeraHashrate
    def __init__(self, default: _Optional[_Union[TeraHashrate, _Mapping]] = ..., min: _Optional[_Union[TeraHashrate, _Mapping]] = ..., max: _Optional[_Union[TeraHashrate, _Mapping]] = ...) -> None: ...

class TunerConstraints(_message.Message):
    __slots__ = ("power_target", "hashrate_target", "enabled", "default_mode")
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    HASHRATE_TARGET_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    power_target: PowerConstraints
    hashrate_target: HashrateConstraints
    enabled: BooleanConstraint
    default_mode: TunerMode
    def __init__(self, power_target: _Optional[_Union[PowerConstraints, _Mapping]] = ..., hashrate_target: _Optional[_Union[HashrateConstraints, _Mapping]] = ..., enabled: _Optional[_Union[BooleanConstraint, _Mapping]] = ..., default_mode: _Optional[_Union[TunerMode, str]] = ...) -> None: ...

class TunerConfiguration(_message.Message):
    __slots__ = ("enabled", "tuner_mode", "power_target", "hashrate_target")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TUNER_MODE_FIELD_NUMBER: _ClassVar[int]
    POWER_TARGET_FIELD_NUMBER: _ClassVar[int]
    HASHRATE_TARGET_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    tuner_mode: TunerMode
    power_target: Power
    hashrate_target: TeraHashrate
    def __init__(self, enabled: bool = ..., tuner_mode: _Optional[_Union[TunerMode, str]] = ..., power_target: _Optional[_Union[Power, _Mapping]] = ..., hashrate_target: _Optional[_Union[TeraHashrate, _Mapping]] = ...) -> None: ...

class GetMinerConfigurationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMinerConfigurationResponse(_message.Message):
    __slots__ = ("tuner",)
    TUNER_FIELD_NUMBER: _ClassVar[int]
    tuner: TunerConfiguration
    def __init__(self, tuner: _Optional[_Union[TunerConfiguration, _Mapping]] = ...) -> None: ...

class GetConstraintsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConstraintsResponse(_message.Message):
    __slots__ = ("tuner_constraints",)
    TUNER_CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    tuner_constraints: TunerConstraints
    def __init__(self, tuner_constraints: _Optional[_Union[TunerConstraints, _Mapping]] = ...) -> None: ...

class MinerIdentity(_message.Message):
    __slots__ = ("brand", "name", "miner_model")
    BRAND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    brand: MinerBrand
    name: str
    miner_model: str
    def __init__(self, brand: _Optional[_Union[MinerBrand, str]] = ..., name: _Optional[str] = ..., miner_model: _Optional[str] = ...) -> None: ...

class BosVersion(_message.Message):
    __slots__ = ("current", "major", "bos_plus")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    BOS_PLUS_FIELD_NUMBER: _ClassVar[int]
    current: str
    major: str
    bos_plus: bool
    def __init__(self, current: _Optional[str] = ..., major: _Optional[str] = ..., bos_plus: bool = ...) -> None: ...

class GetMinerDetailsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMinerDetailsResponse(_message.Message):
    __slots__ = ("uid", "miner_identity", "bos_version", "hostname", "mac_address", "sticker_hashrate", "bosminer_uptime_s", "system_uptime_s", "status")
    UID_FIELD_NUMBER: _ClassVar[int]
    MINER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    BOS_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MAC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STICKER_HASHRATE_FIELD_NUMBER: _ClassVar[int]
    BOSMINER_UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    miner_identity: MinerIdentity
    bos_version: BosVersion
    hostname: str
    mac_address: str
    sticker_hashrate: GigaHashrate
    bosminer_uptime_s: int
    system_uptime_s: int
    status: MinerStatus
    def __init__(self, uid: _Optional[str] = ..., miner_identity: _Optional[_Union[MinerIdentity, _Mapping]] = ..., bos_version: _Optional[_Union[BosVersion, _Mapping]] = ..., hostname: _Optional[str] = ..., mac_address: _Optional[str] = ..., sticker_hashrate: _Optional[_Union[GigaHashrate, _Mapping]] = ..., bosminer_uptime_s: _Optional[int] = ..., system_uptime_s: _Optional[int] = ..., status: _Optional[_Union[MinerStatus, str]] = ...) -> None: ...

class RealHashrate(_message.Message):
    __slots__ = ("last_5s", "last_15s", "last_30s", "last_1m", "last_5m")
    LAST_5S_FIELD_NUMBER: _ClassVar[int]
    LAST_15S_FIELD_NUMBER: _ClassVar[int]
    LAST_30S_FIELD_NUMBER: _ClassVar[int]
    LAST_1M_FIELD_NUMBER: _ClassVar[int]
    LAST_5M_FIELD_NUMBER: _ClassVar[int]
    last_5s: GigaHashrate
    last_15s: GigaHashrate
    last_30s: GigaHashrate
    last_1m: GigaHashrate
    last_5m: GigaHashrate
    def __init__(self, last_5s: _Optional[_Union[GigaHashrate, _Mapping]] = ..., last_15s: _Optional[_Union[GigaHashrate, _Mapping]] = ..., last_30s: _Optional[_Union[GigaHashrate, _Mapping]] = ..., last_1m: _Optional[_Union[GigaHashrate, _Mapping]] = ..., last_5m: _Optional[_Union[GigaHashrate, _Mapping]] = ...) -> None: ...

class WorkSolverStats(_message.Message):
    __slots__ = ("real_hashrate", "nominal_hashrate")
    REAL_HASHRATE_FIELD_NUMBER: _ClassVar[int]
    NOMINAL_HASHRATE_FIELD_NUMBER: _ClassVar[int]
    real_hashrate: RealHashrate
    nominal_hashrate: GigaHashrate
    def __init__(self, real_hashrate: _Optional[_Union[RealHashrate, _Mapping]] = ..., nominal_hashrate: _Optional[_Union[GigaHashrate, _Mapping]] = ...) -> None: ...

class MinerPowerStats(_message.Message):
    __slots__ = ("approximated_consumption", "efficiency")
    APPROXIMATED_CONSUMPTION_FIELD_NUMBER: _ClassVar[int]
    EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    approximated_consumption: Power
    efficiency: PowerEfficiency
    def __init__(self, approximated_consumption: _Optional[_Union[Power, _Mapping]] = ..., efficiency: _Optional[_Union[PowerEfficiency, _Mapping]] = ...) -> None: ...

class GetMinerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMinerStatsResponse(_message.Message):
    __slots__ = ("miner_stats", "power_stats")
    MINER_STATS_FIELD_NUMBER: _ClassVar[int]
    POWER_STATS_FIELD_NUMBER: _ClassVar[int]
    miner_stats: WorkSolverStats
    power_stats: MinerPowerStats
    def __init__(self, miner_stats: _Optional[_Union[WorkSolverStats, _Mapping]] = ..., power_stats: _Optional[_Union[MinerPowerStats, _Mapping]] = ...) -> None: ...
