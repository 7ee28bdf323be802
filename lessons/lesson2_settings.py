"""lesson2.py's settings, one row per mode: what lesson2.py reads and what the benchmarks import.

cpu: the default (`make lesson`), minutes on a laptop CPU. quick: a smoke run of seconds (also
`--accuracy --quick`). accuracy: one network from scratch on all 50,000 training images. full:
--accuracy's GPU setting, a wider network. A value given on the command line wins.
"""

MODES = {
    "cpu": dict(
        widths=(16, 32, 64),  # simple_resnet's channels per stage
        n_labelled=250,  # labelled training images of the new task (--labelled)
        n_valid=500,  # validation images, held out of the labelled ones
        n_source=None,  # images of the source classes for step 0 (None: all 30,000)
        n_test=None,  # test images (None: every one of the task's classes)
        pretrain_epochs=4,  # step 0, on the source classes (cached)
        batch_size=64,
        # image sizes: every cycle of step 8 but the last at the first, the last at the last
        sizes=(28,),
        data_size=128,  # --data: the image size (your photos, for an ImageNet body)
        head_epochs=30,  # step 3, on cached activations: seconds
        cycles=3,  # step 8: SGDR cycles of 1, 2, 4, ... epochs
        min_cycle_steps=30,  # few labels: a cycle of 1 "epoch" is at least this many steps
        lr_find_steps=100,
        tta_views=4,  # random views besides the plain one; 0: the mirror image
        # the self-check's floor of test accuracy, well below what was measured (docs/recipe.md)
        floor=0.83,
    ),
    "quick": dict(
        widths=(16, 32, 64), n_labelled=200, n_valid=200, n_source=2000, n_test=500,
        pretrain_epochs=2, batch_size=32, sizes=(20,), data_size=32, head_epochs=5, cycles=2,
        min_cycle_steps=12, lr_find_steps=50, tta_views=2,
        # test accuracy over seeds 0-2 x 1 and 2 threads: 0.736-0.824 (--accuracy --quick, 10
        # classes from scratch on 200 images: 0.332-0.562)
        floor=0.55, floor_from_scratch=0.2,
    ),
    "accuracy": dict(
        widths=(16, 32, 64, 128), n_labelled=50_000, n_valid=10_000, n_source=None, n_test=None,
        pretrain_epochs=4, batch_size=128, sizes=(20, 28), head_epochs=30, cycles=5,
        min_cycle_steps=30, lr_find_steps=100, tta_views=0, floor=0.925,
    ),
    "full": dict(
        widths=(32, 64, 128, 256), n_labelled=50_000, n_valid=10_000, n_source=None, n_test=None,
        pretrain_epochs=4, batch_size=256, sizes=(28, 32), head_epochs=30, cycles=5,
        min_cycle_steps=30, lr_find_steps=100, tta_views=0, floor=0.95,
    ),
}
