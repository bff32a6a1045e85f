"""Training: the package Learner and its lean loop (`learner`, `loop`), the optimiser, learning curves,
checkpoints, data-parallel launches (`distributed`) and the steps every experiment shares (`experiment`).
Imports only `core`."""
