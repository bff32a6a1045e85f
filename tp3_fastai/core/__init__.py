"""The ground floor: the device and the precision that really run (`device`), run folders, JSON files,
Markdown tables and figures (`runs`), and the one list of fastai's private names the package relies on
(`fastai_internals`). Imports nothing else of the package."""
