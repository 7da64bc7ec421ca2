"""Data readers: MNIST-like IDX files, CIFAR-10, ImageFolder folders/zips, transforms, caching, loaders.

Main entry points::

    ds = load_dataset("cifar10", "/data/cifar10-jpeg.zip", "train", augment=True)   # or $BITALLOC_DATA
    loader = make_loader(ds, 128, shuffle=True, seed=0)
    calib, rest = calibration_split(load_dataset("imagenet", "/data/imagenet-sample.zip"), 32, seed=0)
    info = dataset_info("mnist")  # num_classes, input_shape, normalization, default_model, ...
"""

from bitalloc.data.cache import CACHE_ENV, CacheWarning, cache_key, cached_arrays, resolve_cache_dir
from bitalloc.data.cifar import (CIFAR10_CLASSES, load_cifar10, load_cifar10_imagefolder, load_cifar10_python,
                                 read_cifar_batch)
from bitalloc.data.idx import MNIST_FILES, find_mnist_files, load_mnist_like, read_idx, write_idx
from bitalloc.data.imagefolder import (IMAGE_EXTENSIONS, ImageFolder, ImageSource, image_folder_in_memory,
                                       load_image_folder_arrays)
from bitalloc.data.loader import calibration_split, make_loader, strided_split, unwrap_in_memory
from bitalloc.data.memory import InMemoryImageDataset
from bitalloc.data.registry import (DATA_ENV, DATASETS, DatasetInfo, dataset_info, dataset_names, load_dataset,
                                    resolve_data_root)
from bitalloc.data.transforms import (CIFAR10_NORM, FASHION_MNIST_NORM, IMAGENET_LITE_NORM, IMAGENET_NORM,
                                      MNIST_NORM, TRANSFORMS, Normalization, Preprocess, center_crop,
                                      get_transform, pil_to_array, random_crop_flip, resize_short_side)

__all__ = [
    "load_dataset", "dataset_info", "dataset_names", "DatasetInfo", "DATASETS", "DATA_ENV", "resolve_data_root",
    "make_loader", "calibration_split", "strided_split", "unwrap_in_memory", "InMemoryImageDataset",
    "read_idx", "write_idx", "find_mnist_files", "load_mnist_like", "MNIST_FILES",
    "read_cifar_batch", "load_cifar10", "load_cifar10_python", "load_cifar10_imagefolder", "CIFAR10_CLASSES",
    "ImageFolder", "ImageSource", "image_folder_in_memory", "load_image_folder_arrays", "IMAGE_EXTENSIONS",
    "Normalization", "Preprocess", "TRANSFORMS", "get_transform", "resize_short_side", "center_crop",
    "pil_to_array", "random_crop_flip",
    "MNIST_NORM", "FASHION_MNIST_NORM", "CIFAR10_NORM", "IMAGENET_LITE_NORM", "IMAGENET_NORM",
    "CACHE_ENV", "CacheWarning", "cache_key", "cached_arrays", "resolve_cache_dir",
]
