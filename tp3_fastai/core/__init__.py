"""The ground floor: the device and the precision that really run (`device`), run folders, JSON files,
Markdown tables and figures (`runs`), configuration dataclasses and the default cache folder (`config`), checks of
user-given names (`checks`). Imports nothing else of the package."""
