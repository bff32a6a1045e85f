"""The ground floor: the device and the precision that really run (`device`), run folders, JSON files,
Markdown tables and figures (`runs`), configuration dataclasses and the default cache folder (`config`), checks of
user-given names (`checks`), and the one list of fastai's private names the package relies on (`fastai_internals`).
Imports nothing else of the package."""
