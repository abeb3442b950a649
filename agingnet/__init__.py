"""agingnet: personalized face age transformation (SAM / MyTimeMachine lineage) on Lightning + Hydra."""

__version__ = "0.1.0"
