"""Image-folder input pipelines that keep fastai's DataLoaders: fastai's PIL item pipeline, or the device pipeline
(workers read bytes; decoding, crops and augmentation run on the training device, nvJPEG on CUDA), optionally with
a resident cache of decoded images; plus the remembered image check. No pipeline waits for the device per batch:
batches go over from staged memory without blocking, every draw happens on the device, fastai's augmentation runs
without its host reads, and the next batches are prepared on a background thread.

Modules: ``files`` (encoded images with their headers checked where they are read, batches of them, file
signatures), ``decode`` (batched JPEG decoding, the PIL fallback, the stored size), ``crop`` (random resized / centre
crops, flips and fastai's affine augmentation as one batched resample), ``augment`` (fastai's aug_transforms without
host reads: its draws, AffineWarp, Lighting), ``cache`` (the decoded cache and its memory budget), ``transforms``
(the fastai transforms), ``prefetch`` (batches prepared on a background thread), ``loader`` (the fastai DataLoader:
batches without per-item work, persistent workers, staged transfers), ``check`` (remembered image checks), ``build``
(choosing and building a pipeline's DataLoaders).
"""
from .augment import (AffineSpec, AffineWarp, Augment, Lighting, LightingSpec, draw_affine, draw_flips, read_free,
                      read_free_tfms, reseed_transforms)
from .build import (PIPELINE_LABELS, PIPELINES, check_pipeline, choose_pipeline, default_workers, device_dls,
                    fill_cache, find_decoder, jpeg_share)
from .cache import DecodedCache, cache_budget, free_memory
from .crop import centre_boxes, crop_resize, random_resized_boxes
from .decode import DecodeError, decode_images, stored_size, to_stored, to_stored_batch
from .files import EncodedImage, ImageBatch, collate_images, jpeg_components, jpeg_header, signature
from .loader import ImageFolderDL
from .prefetch import live_prefetch_threads, prefetched
from .transforms import DecodeCropResize, ReadImage

__all__ = ["PIPELINES", "PIPELINE_LABELS", "check_pipeline", "choose_pipeline", "default_workers", "device_dls",
           "find_decoder", "jpeg_share", "fill_cache", "DecodedCache", "cache_budget", "free_memory",
           "centre_boxes", "crop_resize", "draw_flips", "random_resized_boxes", "DecodeError", "decode_images",
           "stored_size", "to_stored", "to_stored_batch", "EncodedImage", "ImageBatch", "collate_images",
           "jpeg_components", "jpeg_header", "signature", "DecodeCropResize", "ImageFolderDL", "ReadImage",
           "AffineSpec", "AffineWarp", "Augment", "Lighting", "LightingSpec", "draw_affine", "read_free",
           "read_free_tfms", "reseed_transforms", "prefetched", "live_prefetch_threads"]
