"""TFDS builder for FER2013 from Kaggle's file, written and read without TensorFlow."""

from __future__ import annotations

import os

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ferjax import data as data_lib
from ferjax.errors import DataError

# The names Kaggle users end up with, in the order they are looked for: the
# plain CSV parses fastest, and ``fer2013/fer2013.csv`` is the tarball unpacked.
SOURCE_NAMES = (
    "fer2013.csv",
    "fer2013.csv.gz",
    "fer2013.tar.gz",
    os.path.join("fer2013", "fer2013.csv"),
)

# TFDS split name -> the ``Usage`` value of fer2013.csv it holds.
SPLITS = {"train": "Training", "validation": "PublicTest", "test": "PrivateTest"}

_HOMEPAGE = ("https://www.kaggle.com/c/"
             "challenges-in-representation-learning-facial-expression-recognition-challenge")

_DESCRIPTION = """\
FER2013: 35,887 grayscale 48x48 face crops, each labelled with one of seven
expressions (angry, disgust, fear, happy, sad, surprise, neutral), collected
with Google image search for the facial expression recognition contest of the
ICML 2013 workshop "Challenges in Representation Learning" (run on Kaggle).
The splits follow the CSV's Usage column: train = Training, validation =
PublicTest (the contest's public leaderboard), test = PrivateTest (its final
ranking). `row` is the 0-based data row of fer2013.csv, the key FER+ labels
join on. Examples are stored in CSV order.
"""

_CITATION = """\
@misc{goodfellow2013challenges,
  title = {Challenges in Representation Learning: A report on three machine
           learning contests},
  author = {Goodfellow, Ian J. and Erhan, Dumitru and Carrier, Pierre Luc and
            Courville, Aaron and Mirza, Mehdi and Hamner, Ben and Cukierski,
            Will and Tang, Yichuan and Thaler, David and Lee, Dong-Hyun and
            Zhou, Yingbo and Ramaiah, Chetan and Feng, Fangxiang and Li, Ruifan
            and Wang, Xiaojie and Athanasakis, Dimitris and Shawe-Taylor, John
            and Milakov, Maxim and Park, John and Ionescu, Radu and Popescu,
            Marius and Grozea, Cristian and Bergstra, James and Xie, Jingjing
            and Romaszko, Lukasz and Xu, Bing and Chuang, Zhang and Bengio,
            Yoshua},
  year = {2013},
  eprint = {1307.0414},
  archivePrefix = {arXiv},
  url = {https://arxiv.org/abs/1307.0414},
}
"""


def find_source(manual_dir: str | os.PathLike) -> str:
  """Returns the FER2013 file in ``manual_dir``.

  Args:
    manual_dir: the TFDS manual download directory.

  Returns:
    The path of the first of :data:`SOURCE_NAMES` present in ``manual_dir``.

  Raises:
    DataError: none of the accepted files is there.
  """
  manual_dir = os.fspath(manual_dir)
  for name in SOURCE_NAMES:
    path = os.path.join(manual_dir, name)
    if os.path.isfile(path):
      return path
  problem = ("no FER2013 file in this manual directory" if os.path.isdir(manual_dir)
             else "this manual directory does not exist")
  raise DataError(
      f"{problem}; put one of {', '.join(SOURCE_NAMES)} (Kaggle's download) "
      "directly in it", path=manual_dir)


def _encode_png(image: np.ndarray) -> bytes:
  # tfds.features.Image encodes numpy arrays with tf.image.encode_png; handing
  # it PNG bytes instead keeps TensorFlow out of the build. PNG is lossless.
  ok, buf = cv2.imencode(".png", image)
  if not ok:
    raise ValueError(f"OpenCV could not PNG-encode an image of shape {image.shape}")
  return buf.tobytes()


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013 from a manually downloaded Kaggle file, stored as ArrayRecord."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: image, label and CSV row index."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download FER2013 from Kaggle ({_HOMEPAGE}, or any mirror of the same file) and
put one of these files directly in the manual directory
(`download_config.manual_dir`, by default `<data_dir>/downloads/manual/`):
""" + "".join(f"  * {name}\n" for name in SOURCE_NAMES)

  # TFDS 4.9.10 derives this from the package via importlib_resources, which it
  # only declares for Python < 3.9, so download_and_prepare fails with
  # ModuleNotFoundError (tensorflow/datasets#11212). The path is this file.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs):
    # ArrayRecord is the one format TFDS writes and reads without TensorFlow
    # (TFRecord goes through tf.io), so it is the default here.
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(data_lib.IMAGE_SIZE, data_lib.IMAGE_SIZE, 1), dtype=np.uint8,
                encoding_format="png"),
            "label": tfds.features.ClassLabel(names=data_lib.FER2013_CLASSES),
            "row": np.int32,
        }),
        supervised_keys=("image", "label"),
        # Keep CSV order so index i of a split is its i-th CSV row, as in
        # ferjax.data; random-access readers shuffle with their index sampler.
        disable_shuffling=True,
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data = data_lib.load_fer2013(find_source(dl_manager.manual_dir), cache=False)
    generators = {}
    for split, usage in SPLITS.items():
      part = data.select(data.splits == usage)
      if not len(part):
        raise DataError(f"no rows with Usage {usage!r}; is this the full fer2013.csv?",
                        path=data.source or dl_manager.manual_dir)
      generators[split] = self._generate_examples(part)
    return generators

  def _generate_examples(self, data: data_lib.FerData):
    for image, label, row in zip(data.images, data.labels, data.rows):
      # The CSV row is unique and, with shuffling off, sets the stored order.
      yield int(row), {"image": _encode_png(image), "label": int(label), "row": int(row)}
