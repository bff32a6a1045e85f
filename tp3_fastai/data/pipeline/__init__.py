"""Image-folder input pipelines that keep fastai's DataLoaders: fastai's PIL item pipeline, or the device pipeline
(workers read bytes; decoding, crops and augmentation run on the training device, nvJPEG on CUDA), optionally with
a resident cache of decoded images; plus the remembered image check.

Modules: ``files`` (encoded images, batches of them, file signatures), ``decode`` (batched JPEG decoding, the PIL
fallback, the stored size), ``crop`` (random resized / centre crops and flips as one batched resample), ``cache``
(the decoded cache and its memory budget), ``transforms`` (the fastai transforms), ``loader`` (the
fastai DataLoader: batches without per-item work, persistent workers), ``check`` (remembered image
checks), ``build`` (choosing and building a pipeline's DataLoaders).
"""
from .build import (PIPELINE_LABELS, PIPELINES, check_pipeline, choose_pipeline, default_workers, device_dls,
                    fill_cache, find_decoder)
from .cache import DecodedCache, cache_budget, free_memory
from .crop import centre_boxes, crop_resize, draw_flips, random_resized_boxes
from .decode import DecodeError, decode_images, stored_size, to_stored
from .files import EncodedImage, ImageBatch, collate_images, jpeg_components, signature
from .loader import ImageFolderDL
from .transforms import DecodeCropResize, ReadImage

__all__ = ["PIPELINES", "PIPELINE_LABELS", "check_pipeline", "choose_pipeline", "default_workers", "device_dls",
           "find_decoder",
           "fill_cache", "DecodedCache", "cache_budget", "free_memory", "centre_boxes", "crop_resize", "draw_flips",
           "random_resized_boxes", "DecodeError", "decode_images", "stored_size", "to_stored", "EncodedImage",
           "ImageBatch", "collate_images", "jpeg_components", "signature", "DecodeCropResize", "ImageFolderDL",
           "ReadImage"]
