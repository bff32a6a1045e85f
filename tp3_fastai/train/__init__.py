"""Training: the package Learner and its lean loop (`learner`, `loop`), the optimiser, learning curves,
checkpoints, data-parallel launches (`distributed`), the steps every experiment shares (`experiment`) and the one
table of training modes (`modes`: what each mode freezes, whether BatchNorm trains, which commands take it).
Imports only `core`."""
