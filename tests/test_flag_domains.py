"""Every numeric flag of every script has a domain, checked by check_args before anything starts."""
import importlib
import importlib.util
import os

import pytest

import utils
from conftest import REPO, run_script

SCRIPTS = {  # name: path from the repository root, and the flags its check_args needs besides the ones tested
    "main_dino": ("main_dino.py", []),
    "eval_knn": ("eval_knn.py", []),
    "eval_linear": ("eval_linear.py", []),
    "visualize_attention": ("visualize_attention.py", []),
    "video_generation": ("video_generation.py", []),
    "run_with_submitit": ("run_with_submitit.py", []),
    "bench_train": ("benchmarks/bench_train.py", []),
    "profile_step": ("benchmarks/profile_step.py", []),
    "prepare_fashion_mnist": ("tools/prepare_fashion_mnist.py", []),
    "knn_raw_pixels": ("experiments/fashion_mnist/knn_raw_pixels.py", []),
    "patch_knn": ("experiments/fashion_mnist/patch_knn.py", []),
    "random_init": ("experiments/fashion_mnist/random_init.py", ["--output", "random.pth"]),
    "extract_region_features": ("tools/extract_region_features.py", []),
    "make_mosaics": ("experiments/hipt_mosaics/make_mosaics.py", []),
}

_modules = {}


def script(name):
    """The script imported as a module (those outside the repository root from their file)."""
    if name not in _modules:
        path = SCRIPTS[name][0]
        if os.path.dirname(path):
            spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(name)
        _modules[name] = module
    return _modules[name]


def parse(name, argv):
    return script(name).get_args_parser().parse_args([*SCRIPTS[name][1], *map(str, argv)])


def check(name, argv):
    """check_args of the script on its parser's reading of argv."""
    script(name).check_args(parse(name, argv))


# (script, flags, the whole error message, written out by hand)
BAD_VALUES = [
    ("visualize_attention", "--pca_threshold inf", "--pca_threshold inf: must be a finite number"),
    ("video_generation", "--pca_fit_tokens 2", "--pca_fit_tokens 2: must be >= 3"),
    ("main_dino", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("main_dino", "--patch_size -3", "--patch_size -3: must be >= 1"),
    ("main_dino", "--out_dim 0", "--out_dim 0: must be >= 1"),
    ("main_dino", "--momentum_teacher -0.1", "--momentum_teacher -0.1: must be in [0, 1]"),
    ("main_dino", "--momentum_teacher 1.5", "--momentum_teacher 1.5: must be in [0, 1]"),
    ("main_dino", "--momentum_teacher_end -0.1", "--momentum_teacher_end -0.1: must be in [0, 1]"),
    ("main_dino", "--momentum_teacher_end 1.5", "--momentum_teacher_end 1.5: must be in [0, 1]"),
    ("main_dino", "--warmup_teacher_temp 0", "--warmup_teacher_temp 0.0: must be > 0"),
    ("main_dino", "--teacher_temp 0", "--teacher_temp 0.0: must be > 0"),
    ("main_dino", "--teacher_temp -0.04", "--teacher_temp -0.04: must be > 0"),
    ("main_dino", "--warmup_teacher_temp_epochs -1", "--warmup_teacher_temp_epochs -1: must be >= 0"),
    ("main_dino", "--weight_decay -0.1", "--weight_decay -0.1: must be >= 0"),
    ("main_dino", "--weight_decay_end -1", "--weight_decay_end -1.0: must be >= 0"),
    ("main_dino", "--clip_grad -1", "--clip_grad -1.0: must be >= 0"),
    ("main_dino", "--batch_size_per_gpu 0", "--batch_size_per_gpu 0: must be >= 1"),
    ("main_dino", "--epochs 0", "--epochs 0: must be >= 1"),
    ("main_dino", "--freeze_last_layer -1", "--freeze_last_layer -1: must be >= 0"),
    ("main_dino", "--lr -1", "--lr -1.0: must be > 0"),
    ("main_dino", "--lr 0", "--lr 0.0: must be > 0"),
    ("main_dino", "--lr inf", "--lr inf: must be a finite number > 0"),
    ("main_dino", "--lr nan", "--lr nan: must be a finite number > 0"),
    ("main_dino", "--warmup_epochs -1", "--warmup_epochs -1.0: must be >= 0"),
    ("main_dino", "--min_lr=-1e-6", "--min_lr -1e-06: must be >= 0"),
    ("main_dino", "--drop_path_rate 1.5", "--drop_path_rate 1.5: must be in [0, 1)"),
    ("main_dino", "--drop_path_rate 1", "--drop_path_rate 1.0: must be in [0, 1)"),
    ("main_dino", "--drop_path_rate -0.1", "--drop_path_rate -0.1: must be in [0, 1)"),
    ("main_dino", "--global_crops_scale 0 1", "--global_crops_scale 0.0 1.0: each value must be in (0, 1]"),
    ("main_dino", "--global_crops_scale 0.4 1.5", "--global_crops_scale 0.4 1.5: each value must be in (0, 1]"),
    ("main_dino", "--local_crops_scale 0.05 -0.4", "--local_crops_scale 0.05 -0.4: each value must be in (0, 1]"),
    ("main_dino", "--local_crops_number -1", "--local_crops_number -1: must be >= 0"),
    ("main_dino", "--global_crops_size 0", "--global_crops_size 0: must be >= 1"),
    ("main_dino", "--local_crops_size 0", "--local_crops_size 0: must be >= 1"),
    ("main_dino", "--ibot_loss_weight -1", "--ibot_loss_weight -1.0: must be >= 0"),
    ("main_dino", "--mask_sample_probability 1.5", "--mask_sample_probability 1.5: must be in [0, 1]"),
    ("main_dino", "--mask_ratio_min_max -0.1 0.5", "--mask_ratio_min_max -0.1 0.5: each value must be in [0, 1]"),
    ("main_dino", "--ibot_out_dim 0", "--ibot_out_dim 0: must be >= 1"),
    ("main_dino", "--koleo_loss_weight -0.1", "--koleo_loss_weight -0.1: must be >= 0"),
    ("main_dino", "--layerwise_decay 0", "--layerwise_decay 0.0: must be in (0, 1]"),
    ("main_dino", "--patch_embed_lr_mult -1", "--patch_embed_lr_mult -1.0: must be >= 0"),
    ("main_dino", "--layerscale=-1e-5", "--layerscale -1e-05: must be >= 0"),
    ("main_dino", "--knn_freq 0", "--knn_freq 0: must be >= 1"),
    ("main_dino", "--knn_k 0", "--knn_k 0: must be >= 1"),
    ("main_dino", "--knn_temperature 0", "--knn_temperature 0.0: must be > 0"),
    ("main_dino", "--knn_batch_size 0", "--knn_batch_size 0: must be >= 1"),
    ("main_dino", "--resize_size 0", "--resize_size 0: must be >= 1"),
    ("main_dino", "--crop_size 0", "--crop_size 0: must be >= 1"),
    ("main_dino", "--saveckp_freq -1", "--saveckp_freq -1: must be >= 0"),
    ("main_dino", "--seed -1", "--seed -1: must be >= 0"),
    ("main_dino", "--log_freq 0", "--log_freq 0: must be >= 1"),
    ("main_dino", "--region_in_dim 0", "--region_in_dim 0: must be >= 1"),
    ("main_dino", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("main_dino", "--local_rank -1", "--local_rank -1: must be >= 0"),
    ("main_dino", "--local-rank -2", "--local_rank -2: must be >= 0"),
    ("eval_knn", "--batch_size_per_gpu 0", "--batch_size_per_gpu 0: must be >= 1"),
    ("eval_knn", "--nb_knn 10 0", "--nb_knn 10 0: each value must be >= 1"),
    ("eval_knn", "--temperature 0", "--temperature 0.0: must be > 0"),
    ("eval_knn", "--temperature -1", "--temperature -1.0: must be > 0"),
    ("eval_knn", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("eval_knn", "--resize_size 0", "--resize_size 0: must be >= 1"),
    ("eval_knn", "--crop_size 0", "--crop_size 0: must be >= 1"),
    ("eval_knn", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("eval_knn", "--local_rank -1", "--local_rank -1: must be >= 0"),
    ("eval_knn", "--region_in_dim 0", "--region_in_dim 0: must be >= 1"),
    ("eval_linear", "--n_last_blocks 0", "--n_last_blocks 0: must be >= 1"),
    ("eval_linear", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("eval_linear", "--epochs 0", "--epochs 0: must be >= 1"),
    ("eval_linear", "--lr 0", "--lr 0.0: must be > 0"),
    ("eval_linear", "--lr -0.001", "--lr -0.001: must be > 0"),
    ("eval_linear", "--batch_size_per_gpu 0", "--batch_size_per_gpu 0: must be >= 1"),
    ("eval_linear", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("eval_linear", "--local_rank -1", "--local_rank -1: must be >= 0"),
    ("eval_linear", "--val_freq 0", "--val_freq 0: must be >= 1"),
    ("eval_linear", "--num_labels 0", "--num_labels 0: must be >= 1"),
    ("eval_linear", "--resize_size 0", "--resize_size 0: must be >= 1"),
    ("eval_linear", "--crop_size -1", "--crop_size -1: must be >= 1"),
    ("eval_linear", "--train_crop_scale 0 1", "--train_crop_scale 0.0 1.0: each value must be in (0, 1]"),
    ("eval_linear", "--seed -1", "--seed -1: must be >= 0"),
    ("eval_linear", "--region_in_dim -1", "--region_in_dim -1: must be >= 1"),
    ("visualize_attention", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("visualize_attention", "--image_size 480 0", "--image_size 480 0: each value must be >= 1"),
    ("visualize_attention", "--threshold 0", "--threshold 0.0: must be in (0, 1]"),
    ("visualize_attention", "--threshold 1.5", "--threshold 1.5: must be in (0, 1]"),
    ("visualize_attention", "--region_in_dim 0", "--region_in_dim 0: must be >= 1"),
    ("visualize_attention", "--tile_patch_size 0", "--tile_patch_size 0: must be >= 1"),
    ("visualize_attention", "--tile_size -1", "--tile_size -1: must be >= 1"),
    ("visualize_attention", "--mean 0 0 inf", "--mean 0.0 0.0 inf: each value must be a finite number"),
    ("visualize_attention", "--std 1 1 -1", "--std 1.0 1.0 -1.0: each value must be > 0"),
    ("video_generation", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("video_generation", "--threshold 0", "--threshold 0.0: must be in (0, 1]"),
    ("video_generation", "--threshold 1.01", "--threshold 1.01: must be in (0, 1]"),
    ("video_generation", "--resize 0", "--resize 0: each value must be >= 1"),
    ("video_generation", "--fps 0", "--fps 0.0: must be > 0"),
    ("video_generation", "--batch_size 0", "--batch_size 0: must be >= 1"),
    ("video_generation", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("run_with_submitit", "--ngpus -1", "--ngpus -1: must be >= 0"),
    ("run_with_submitit", "--nodes 0", "--nodes 0: must be >= 1"),
    ("run_with_submitit", "--timeout 0", "--timeout 0: must be >= 1"),
    ("run_with_submitit", "--tasks_per_node 0", "--tasks_per_node 0: must be >= 1"),
    ("run_with_submitit", "--cpus_per_task 0", "--cpus_per_task 0: must be >= 1"),
    ("run_with_submitit", "--mem_gb 0", "--mem_gb 0.0: must be > 0"),
    ("run_with_submitit", "--signal_delay_s -1", "--signal_delay_s -1: must be >= 0"),
    ("profile_step", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("profile_step", "--global_crops_size 0", "--global_crops_size 0: must be >= 1"),
    ("profile_step", "--local_crops_size 0", "--local_crops_size 0: must be >= 1"),
    ("profile_step", "--local_crops_number -1", "--local_crops_number -1: must be >= 0"),
    ("profile_step", "--out_dim 0", "--out_dim 0: must be >= 1"),
    ("profile_step", "--batch_size_per_gpu 0", "--batch_size_per_gpu 0: must be >= 1"),
    ("profile_step", "--steps 0", "--steps 0: must be >= 1"),
    ("profile_step", "--warmup -1", "--warmup -1: must be >= 0"),
    ("bench_train", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("bench_train", "--batch_size_per_gpu 64 0", "--batch_size_per_gpu 64 0: each value must be >= 1"),
    ("bench_train", "--out_dim 0", "--out_dim 0: must be >= 1"),
    ("bench_train", "--global_crops_size 0", "--global_crops_size 0: must be >= 1"),
    ("bench_train", "--local_crops_size 0", "--local_crops_size 0: must be >= 1"),
    ("bench_train", "--local_crops_number -1", "--local_crops_number -1: must be >= 0"),
    ("bench_train", "--iters 0", "--iters 0: must be >= 1"),
    ("bench_train", "--rounds 0", "--rounds 0: must be >= 1"),
    ("bench_train", "--warmup -1", "--warmup -1: must be >= 0"),
    ("bench_train", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("bench_train", "--num_images 0", "--num_images 0: must be >= 1"),
    ("bench_train", "--image_size 500 4", "--image_size 500 4: each value must be >= 8"),
    ("bench_train", "--knn_batch_size 0", "--knn_batch_size 0: must be >= 1"),
    ("bench_train", "--aug_worker_images 0", "--aug_worker_images 0: must be >= 1"),
    ("prepare_fashion_mnist", "--size 0", "--size 0: must be >= 1"),
    ("prepare_fashion_mnist", "--train_per_class -1", "--train_per_class -1: must be >= 0"),
    ("prepare_fashion_mnist", "--val_per_class -1", "--val_per_class -1: must be >= 0"),
    ("knn_raw_pixels", "--nb_knn 0", "--nb_knn 0: each value must be >= 1"),
    ("knn_raw_pixels", "--temperature 0", "--temperature 0.0: must be > 0"),
    ("patch_knn", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("patch_knn", "--resize_size 0", "--resize_size 0: must be >= 1"),
    ("patch_knn", "--crop_size 0", "--crop_size 0: must be >= 1"),
    ("patch_knn", "--nb_knn 0", "--nb_knn 0: each value must be >= 1"),
    ("patch_knn", "--temperature 0", "--temperature 0.0: must be > 0"),
    ("patch_knn", "--batch_size 0", "--batch_size 0: must be >= 1"),
    ("patch_knn", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("random_init", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("random_init", "--seed -1", "--seed -1: must be >= 0"),
    ("random_init", "--region_in_dim 0", "--region_in_dim 0: must be >= 1"),
    ("make_mosaics", "--train_per_class 0", "--train_per_class 0: must be >= 1"),
    ("make_mosaics", "--val_per_class 0", "--val_per_class 0: must be >= 1"),
    ("make_mosaics", "--grid 0", "--grid 0: must be >= 2"),
    ("make_mosaics", "--seed -1", "--seed -1: must be >= 0"),
    ("extract_region_features", "--patch_size 0", "--patch_size 0: must be >= 1"),
    ("extract_region_features", "--region_size 0", "--region_size 0: must be >= 1"),
    ("extract_region_features", "--tile_size 0", "--tile_size 0: must be >= 1"),
    ("extract_region_features", "--batch_size 0", "--batch_size 0: must be >= 1"),
    ("extract_region_features", "--num_workers -1", "--num_workers -1: must be >= 0"),
    ("extract_region_features", "--mean 0.5 nan 0.5", "--mean 0.5 nan 0.5: each value must be a finite number"),
    ("extract_region_features", "--std 0.5 0 0.5", "--std 0.5 0.0 0.5: each value must be > 0"),
]
# run_with_submitit takes every main_dino flag and checks them too, before queuing the job
BAD_VALUES += [("run_with_submitit", flags, message) for name, flags, message in BAD_VALUES if name == "main_dino"]


@pytest.mark.parametrize("name,flags,message", BAD_VALUES, ids=[f"{n} {f}" for n, f, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_flag_and_value(name, flags, message):
    with pytest.raises(utils.InputError) as e:
        check(name, flags.split())
    assert str(e.value) == message


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_has_a_bad_value_above(name):
    parser = script(name).get_args_parser()
    numeric = {a.dest for a in parser._actions if a.type in (int, float)}
    tested = {message.split()[0].removeprefix("--") for n, _, message in BAD_VALUES if n == name}
    assert numeric - tested == set()


@pytest.mark.parametrize("name", SCRIPTS)
def test_defaults_pass(name, tmp_path, image_folder):
    placeholders = {"video_generation": ["--input_path", tmp_path],  # paths check_args looks at
                    "run_with_submitit": ["--data_path", image_folder]}
    check(name, placeholders.get(name, []))


@pytest.mark.parametrize("name,flags", [
    ("main_dino", "--momentum_teacher 1.0"),
    ("main_dino", "--momentum_teacher 0"),
    ("main_dino", "--momentum_teacher_end 0.98"),
    ("main_dino", "--clip_grad 0"),
    ("main_dino", "--drop_path_rate 0"),
    ("main_dino", "--drop_path_rate 0.999"),
    ("main_dino", "--local_crops_number 0"),
    ("main_dino", "--global_crops_scale 1 1 --local_crops_scale 0.001 0.001"),
    ("main_dino", "--saveckp_freq 0 --seed 0 --num_workers 0 --freeze_last_layer 0 --min_lr 0"),
    ("main_dino", "--warmup_epochs 0 --warmup_teacher_temp_epochs 0 --weight_decay 0 --weight_decay_end 0"),
    ("main_dino", "--epochs 1 --warmup_epochs 1 --batch_size_per_gpu 1 --out_dim 1 --log_freq 1"),
    ("main_dino", "--lr 1e-12 --teacher_temp 1e-6 --warmup_teacher_temp 1e-6"),
    ("main_dino", "--arch vit4k_xs --region_in_dim 1 --global_crops_size 1 --local_crops_size 1"),
    ("eval_knn", "--nb_knn 1 --temperature 1e-4"),
    ("eval_knn", "--resize_size 32 --crop_size 64"),  # a crop larger than the resized image is padded
    ("eval_linear", "--num_labels 1 --n_last_blocks 1 --train_crop_scale 1 1"),
    ("visualize_attention", "--threshold 1 --image_size 1"),
    ("visualize_attention", "--arch vit4k_xs --tile_patch_size 1 --tile_size 1 --region_in_dim 1"),
    ("video_generation", "--threshold 1 --num_workers 0 --fps 0.5 --input_path ."),
    ("run_with_submitit", "--ngpus 0 --signal_delay_s 0 --mem_gb 0.5 --data_path DATA"),
    ("bench_train", "--image_size 8 8 --warmup 0 --num_workers 0 --local_crops_number 0"),
    ("prepare_fashion_mnist", "--train_per_class 0 --val_per_class 0 --size 1"),
    ("extract_region_features", "--region_size 28 --tile_size 28 --patch_size 28 --num_workers 0 --mean -1 0 9"),
])
def test_boundary_values_pass(name, flags, image_folder):
    check(name, [image_folder if f == "DATA" else f for f in flags.split()])


@pytest.mark.parametrize("name,flags,message", [
    ("main_dino", "--patch_size 30 --global_crops_size 28 --local_crops_size 28",
     "--patch_size 30 is larger than --global_crops_size 28"),
    ("main_dino", "--global_crops_size 5", "--patch_size 16 is larger than --global_crops_size 5"),
    ("main_dino", "--arch deit_small --local_crops_size 8", "--patch_size 16 is larger than --local_crops_size 8"),
    ("main_dino", "--knn_data_path data --crop_size 8", "--patch_size 16 is larger than --crop_size 8"),
    ("eval_knn", "--patch_size 16 --crop_size 15", "--patch_size 16 is larger than --crop_size 15"),
    ("eval_linear", "--arch vit_tiny --patch_size 32 --crop_size 28", "--patch_size 32 is larger than --crop_size 28"),
    ("bench_train", "--arch resnet50 vit_tiny --global_crops_size 8",
     "--patch_size 16 is larger than --global_crops_size 8: vit_tiny"),
])
def test_vit_patch_larger_than_a_crop_names_both_flags(name, flags, message):
    with pytest.raises(utils.InputError) as e:
        check(name, flags.split())
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,flags", [
    ("main_dino", "--patch_size 16 --global_crops_size 16 --local_crops_size 16"),  # one patch per crop is enough
    ("main_dino", "--local_crops_number 0 --local_crops_size 8"),  # no local crops: their size is unused
    ("main_dino", "--crop_size 8"),  # no k-NN monitoring: no evaluation crops
    ("main_dino", "--arch resnet50 --patch_size 30 --global_crops_size 28 --local_crops_size 28"),  # no patches
    ("eval_knn", "--crop_size 8 --load_features feats"),  # cached features: no backbone sees a crop
    ("eval_linear", "--arch resnet50 --crop_size 8"),
])
def test_patch_checks_apply_only_to_crops_a_vit_sees(name, flags):
    check(name, flags.split())


def test_domain_bounds_and_their_wording():
    assert [x in utils.POSITIVE for x in (-1, 0, 1e-300, 5)] == [False, False, True, True]
    assert [x in utils.NON_NEGATIVE for x in (-1e-9, 0, 3)] == [False, True, True]
    assert [x in utils.FRACTION for x in (0, 0.5, 1, 1.0001)] == [False, True, True, False]
    half_open = utils.Domain(0, 1, high_inclusive=False)
    assert [x in half_open for x in (0, 0.999, 1)] == [True, True, False]
    assert float("inf") not in utils.POSITIVE and float("nan") not in utils.NON_NEGATIVE
    below = utils.Domain(high=10, high_inclusive=False)
    assert [x in below for x in (-5, 9.9, 10)] == [True, True, False]
    choice = utils.Domain(values=(1, 2, 4))
    assert [x in choice for x in (1, 3, 4)] == [True, False, True]
    assert [str(d) for d in (utils.POSITIVE, utils.AT_LEAST_ONE, utils.FRACTION, half_open, below, choice)] == \
        ["> 0", ">= 1", "in (0, 1]", "in [0, 1)", "< 10", "one of 1, 2, 4"]


def test_none_means_unset_and_is_not_checked():
    import argparse
    args = argparse.Namespace(threshold=None, resize=None, mem_gb=2.0)
    utils.check_flag_domains(args, {"threshold": utils.FRACTION, "resize": utils.AT_LEAST_ONE,
                                    "mem_gb": utils.POSITIVE})


@pytest.mark.slow
@pytest.mark.parametrize("argv,line", [
    (["main_dino.py", "--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["main_dino.py", "--patch_size", "30", "--global_crops_size", "28", "--local_crops_number", "0"],
     "error: --patch_size 30 is larger than --global_crops_size 28: vit_small cuts every crop into 30x30 patches"),
    (["eval_knn.py", "--nb_knn", "10", "0"], "error: --nb_knn 10 0: each value must be >= 1"),
], ids=["main_dino lr", "main_dino patch", "eval_knn nb_knn"])
def test_script_exits_2_with_one_line_before_reading_data(argv, line, tmp_path):
    proc = run_script([*argv, "--data_path", tmp_path / "missing"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [line]
