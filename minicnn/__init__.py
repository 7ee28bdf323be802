"""minicnn: the fast.ai 2018 lesson-2 recipe for image classifiers, one small module a concept.

Each module can be read, and copied, on its own; this file only gathers their public names.
"""
from minicnn.augment import augment, center_crop, lighting, random_affine, resize, side_on, top_down
from minicnn.batch_size import find_batch_size
from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import (Batches, batches, load_fashion_mnist, load_image_folder, normalize,
                          train_valid_split)
from minicnn.diagnose import Diagnosis, diagnose
from minicnn.freeze import bn_freeze, discriminative_lrs, freeze, freeze_to, param_groups, unfreeze
from minicnn.lr_find import LRFindResult, lr_find, suggest_lr
from minicnn.models import efficientnet_lite0, pretrained_classifier, simple_resnet
from minicnn.optim import SGD
from minicnn.plots import (plot_augmented, plot_confusion, plot_losses, plot_lr_find, plot_schedule,
                           plot_top_losses)
from minicnn.precompute import body_and_head, precompute_features
from minicnn.schedule import (cosine_lr, cycle_end_steps, cycle_position, linear_lr, set_lrs,
                              sgdr_lr, step_decay_lr, total_steps)
from minicnn.snapshot import Snapshots, ensemble_predict
from minicnn.train import History, evaluate, fit, predict
from minicnn.tta import predict_tta

__version__ = "0.1.0"
