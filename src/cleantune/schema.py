"""Base for every config: unknown or mistyped keys are errors, never silently ignored."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunBase(StrictModel):
    """What every run config holds, whatever its task; ``task`` tells the kinds apart."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.=+-]+$")
    output_dir: Path = Path("runs")
    seed: int = 42

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name
