"""The ground floor: the device and the precision that really run (`device`), run folders, JSON files,
Markdown tables and figures (`runs`). Imports nothing else of the package."""
