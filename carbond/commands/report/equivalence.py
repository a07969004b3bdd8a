"""One everyday equivalence for a CO2e total on the html page, from a named public factor:
the CO2 from burning petrol, at the US EPA's figure for a gallon of gasoline."""

from __future__ import annotations

from dataclasses import dataclass

from carbond.commands.figures import decimal

LITRES_PER_US_GALLON = 3.785411784  # exact, by definition of the US gallon


@dataclass(frozen=True)
class Equivalence:
    """`grams_per_unit` grams CO2e are one `unit` of the everyday thing."""

    unit: str
    what: str  # what one unit is, after the amount
    grams_per_unit: float
    factor: str  # the published figure, as its source states it
    source: str
    url: str
    brief: str  # factor and source in a few words, for beside each figure

    def amount(self, grams: float) -> float:
        return grams / self.grams_per_unit

    def text(self, grams: float) -> str:
        """"≈ 1.23 L of petrol burned"."""
        return f"\u2248 {decimal(self.amount(grams))}\u00a0{self.unit} {self.what}"


# EPA fact sheet "Greenhouse Gas Emissions from a Typical Passenger Vehicle"
# (EPA-420-F-11-041): "CO2 emissions from a gallon of gasoline: 8,887 grams CO2/gallon", the
# factor of the model year 2012-2016 vehicle GHG standards (75 FR 25324). Tailpipe CO2 only.
PETROL = Equivalence(
    unit="L", what="of petrol burned",
    grams_per_unit=8887.0 / LITRES_PER_US_GALLON,
    factor="8,887 g CO2 per US gallon of gasoline (2,348 g per litre)",
    source="US EPA, Greenhouse Gas Emissions from a Typical Passenger Vehicle "
           "(EPA-420-F-11-041)",
    url="https://www.epa.gov/greenvehicles/greenhouse-gas-emissions-typical-passenger-vehicle",
    brief="2,348 g CO2 per litre (8,887 g per US gallon), US EPA",
)
