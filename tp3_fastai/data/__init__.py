"""Data: MNIST sources and splits (`mnist`), image folders and their sources (`images`), the input pipelines
(`pipeline`: pil, device, cached), the in-memory transfer tasks (`tasks`), the tensor loader (`tensor_loader`) and
downloads (`download`). Imports only `core`."""
