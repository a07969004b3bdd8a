"""Grid carbon intensity: providers, the refreshed feed, zone defaults, emissions arithmetic.

The daemon builds providers from config (`build_providers`), runs an `IntensityFeed` off the
tick thread, and each tick reads `feed.current()` and converts energy with `grams()`.
"""

from carbond.carbon.emissions import grams
from carbond.carbon.forecast import Forecast, fetch_forecast
from carbond.carbon.intensity import FetchError, ForecastPoint, ForecastUnsupported, Intensity
from carbond.carbon.providers import (
    PROVIDER_OPTIONS,
    Provider,
    build_providers,
    provider_specs_from_config,
)
from carbond.carbon.refresher import (
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_REFRESH_SECONDS,
    IntensityFeed,
)
from carbond.carbon.zone import (
    ZoneChoice,
    cloud_hint_sentence,
    cloud_vendor_hint,
    default_zone,
    resolve_zone,
    validate_zone,
)

__all__ = [
    "DEFAULT_MAX_AGE_SECONDS",
    "DEFAULT_REFRESH_SECONDS",
    "PROVIDER_OPTIONS",
    "FetchError",
    "Forecast",
    "ForecastPoint",
    "ForecastUnsupported",
    "Intensity",
    "IntensityFeed",
    "Provider",
    "ZoneChoice",
    "build_providers",
    "cloud_hint_sentence",
    "cloud_vendor_hint",
    "default_zone",
    "fetch_forecast",
    "grams",
    "provider_specs_from_config",
    "resolve_zone",
    "validate_zone",
]
