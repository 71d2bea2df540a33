"""Desktop CIFAR-10 classifier (Dear PyGui): open an image, pick a network, predict.

Threading model: Dear PyGui calls happen only on the interface thread. Loading
params, compiling and predicting run on one worker thread (so the window never
freezes); the worker hands interface updates back through a queue that the
render loop drains every frame (`App.poll`). Callbacks are run by the render loop
too (manual callback management), which keeps tests deterministic: a test calls
`build()`, then the public methods or the registered callbacks, then `render()`.
"""

from __future__ import annotations

import argparse
import importlib.util
import queue
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import dearpygui.dearpygui as dpg
import numpy as np
from PIL import Image

from cifar_flax import images, models
from cifar_flax.data import CLASS_NAMES
from cifar_flax.predict import Predictor, available_runs, load_predictor, training_command

SAMPLES_DIR = Path(__file__).resolve().parent / 'samples'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
NETWORK_LABELS = {'lenet5': 'LeNet-5', 'alexnet8': 'AlexNet', 'vgg16': 'VGG16',
                  'inception10': 'GoogLeNet', 'resnet18': 'ResNet-18'}
VIEW_SIZE = 448  # square image view; images are letterboxed into it, aspect kept
PLOT_SIZE = (640, 360)
TITLE = 'cifar-flax classifier'
ERROR_COLOR = (255, 110, 110)
HINT_COLOR = (150, 150, 150)
GOOD_COLOR = (120, 220, 120)
DISABLED_COLOR = (105, 105, 105)
TOP_BAR_COLOR = (240, 160, 60, 255)


def sample_images() -> dict[str, Path]:
    """Shipped sample photos, by class name."""
    return {path.stem: path for path in sorted(SAMPLES_DIR.glob('*.jpg'))}


def bar_rows(count: int) -> list[float]:
    """Plot rows for the classes: the first class at the top."""
    return [float(count - 1 - i) for i in range(count)]


def find_fonts() -> tuple[Path | None, Path | None]:
    """DejaVu Sans regular and bold from matplotlib's data (a dependency), if installed."""
    spec = importlib.util.find_spec('matplotlib')
    for folder in (spec.submodule_search_locations or []) if spec else []:
        fonts = Path(folder) / 'mpl-data' / 'fonts' / 'ttf'
        regular, bold = fonts / 'DejaVuSans.ttf', fonts / 'DejaVuSans-Bold.ttf'
        if regular.is_file():
            return regular, bold if bold.is_file() else None
    return None, None


def describe(error: BaseException) -> str:
    """An error for the window: our own errors' messages already name the file."""
    if isinstance(error, (OSError, ValueError)) and str(error):
        return str(error)
    return f'{type(error).__name__}: {error}'


def letterbox_rgba(rgb: np.ndarray, size: int = VIEW_SIZE) -> np.ndarray:
    """Fit an (H, W, 3) uint8 image into a size x size RGBA float texture, aspect kept.

    Small images (CIFAR's 32x32) are enlarged with nearest neighbour so the pixels
    the network sees stay visible; the margins are transparent.
    """
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample))
    canvas = np.zeros((size, size, 4), np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w, :3] = resized / 255.0
    canvas[top:top + new_h, left:left + new_w, 3] = 1.0
    return canvas


class App:
    """The classifier window; all state lives here (no module globals)."""

    def __init__(self, ckpt_root: str | Path = 'ckpt', *, conv: str = 'auto',
                 loader: Callable[..., Predictor] = load_predictor):
        self.ckpt_root = Path(ckpt_root)
        self.conv = conv
        self.loader = loader
        self.predictors: dict[str, Predictor] = {}  # loaded once per network, kept
        self.runs: dict[str, Path | None] = {}
        self.network: str | None = None
        self.image_path: Path | None = None
        self.last_probabilities: np.ndarray | None = None
        self.last_error: str | None = None
        self._ui_updates: queue.Queue[Callable[[], None]] = queue.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='cifar-flax-ui')
        self._jobs: list[Future] = []
        self.tags: dict[str, int | str] = {}
        self.built = False

    # ---- window ---------------------------------------------------------------
    def build(self, width: int = 1200, height: int = 720) -> None:
        """Create the context, viewport and widgets (no render loop yet)."""
        dpg.create_context()
        dpg.configure_app(manual_callback_management=True)
        dpg.create_viewport(title=TITLE, width=width, height=height, x_pos=40, y_pos=40)
        with dpg.texture_registry():
            self.tags['texture'] = dpg.add_dynamic_texture(
                VIEW_SIZE, VIEW_SIZE, np.zeros(VIEW_SIZE * VIEW_SIZE * 4, np.float32))
        self._build_file_dialog()
        with dpg.window(tag='main', no_title_bar=True):
            self._build_toolbar()
            dpg.add_separator()
            with dpg.group(horizontal=True):
                with dpg.child_window(width=VIEW_SIZE + 16, height=VIEW_SIZE + 56, no_scrollbar=True):
                    dpg.add_image(self.tags['texture'], width=VIEW_SIZE, height=VIEW_SIZE)
                    self.tags['image_name'] = dpg.add_text('No image: press "Open image..." or pick a sample.',
                                                           color=HINT_COLOR)
                with dpg.group():
                    self._build_network_choice()
                    self._build_result()
        dpg.set_primary_window('main', True)
        self._apply_style()
        self.refresh_networks()
        dpg.setup_dearpygui()
        dpg.show_viewport()
        self.built = True

    def _build_file_dialog(self) -> None:
        with dpg.file_dialog(directory_selector=False, show=False, modal=True, width=720, height=460,
                             callback=self._on_file_dialog, tag='file_dialog'):
            dpg.add_file_extension('Images{' + ','.join(IMAGE_EXTENSIONS) + '}', color=(120, 200, 255, 255))
            for extension in IMAGE_EXTENSIONS:
                dpg.add_file_extension(extension)
            dpg.add_file_extension('.*')
        self.tags['file_dialog'] = 'file_dialog'

    def _build_toolbar(self) -> None:
        with dpg.group(horizontal=True):
            self.tags['open'] = dpg.add_button(label='Open image...', callback=self._on_open)
            dpg.add_text('Samples:')
            self.tags['samples'] = dpg.add_combo(list(sample_images()), width=130, callback=self._on_sample)
            self.tags['rescan'] = dpg.add_button(label='Rescan ckpt/', callback=self._on_rescan)
            self.tags['status'] = dpg.add_text('Ready.')
        self.tags['no_params'] = dpg.add_text('', color=ERROR_COLOR, show=False, wrap=1100)
        self.tags['error'] = dpg.add_text('', color=ERROR_COLOR, show=False, wrap=1100)

    def _build_network_choice(self) -> None:
        dpg.add_text('Network')
        self.tags['networks'] = {}
        self.tags['hints'] = {}
        for network in models.MODEL_NAMES:
            with dpg.group(horizontal=True):
                self.tags['networks'][network] = dpg.add_selectable(
                    label=NETWORK_LABELS[network], width=130, user_data=network, callback=self._on_network)
                self.tags['hints'][network] = dpg.add_text('', color=HINT_COLOR)
        self.tags['params'] = dpg.add_text('Params: choose a network.')
        self.tags['predict'] = dpg.add_button(label='Predict', width=160, height=36, callback=self._on_predict)

    def _build_result(self) -> None:
        dpg.add_spacer(height=6)
        self.tags['label'] = dpg.add_text('Prediction: -', color=GOOD_COLOR)
        self.tags['timing'] = dpg.add_text('', color=HINT_COLOR)
        # Horizontal bars: the class names read as row labels, top to bottom.
        rows = bar_rows(len(CLASS_NAMES))
        with dpg.plot(label='Class probabilities', width=PLOT_SIZE[0], height=PLOT_SIZE[1],
                      no_menus=True, no_mouse_pos=True, no_box_select=True):
            self.tags['x_axis'] = dpg.add_plot_axis(dpg.mvXAxis, label='probability')
            dpg.set_axis_limits(self.tags['x_axis'], 0.0, 1.0)
            self.tags['y_axis'] = dpg.add_plot_axis(dpg.mvYAxis, no_gridlines=True)
            dpg.set_axis_ticks(self.tags['y_axis'], tuple(zip(CLASS_NAMES, rows)))
            dpg.set_axis_limits(self.tags['y_axis'], -0.6, len(CLASS_NAMES) - 0.4)
            zeros = [0.0] * len(rows)
            self.tags['bars'] = dpg.add_bar_series(zeros, rows, weight=0.7, horizontal=True,
                                                   parent=self.tags['y_axis'])
            self.tags['top_bar'] = dpg.add_bar_series(zeros, rows, weight=0.7, horizontal=True,
                                                      parent=self.tags['y_axis'])
        with dpg.theme() as top_bar_theme:
            with dpg.theme_component(dpg.mvBarSeries):
                dpg.add_theme_color(dpg.mvPlotCol_Fill, TOP_BAR_COLOR, category=dpg.mvThemeCat_Plots)
                dpg.add_theme_color(dpg.mvPlotCol_Line, TOP_BAR_COLOR, category=dpg.mvThemeCat_Plots)
        dpg.bind_item_theme(self.tags['top_bar'], top_bar_theme)

    def _apply_style(self) -> None:
        """Readable fonts (matplotlib's DejaVu, when present) and greyed-out disabled items."""
        regular, bold = find_fonts()
        if regular is not None:
            with dpg.font_registry():
                dpg.bind_font(dpg.add_font(str(regular), 17))
                if bold is not None:
                    dpg.bind_item_font(self.tags['label'], dpg.add_font(str(bold), 26))
        with dpg.theme() as theme:
            for item_type in (dpg.mvSelectable, dpg.mvButton):
                with dpg.theme_component(item_type, enabled_state=False):
                    dpg.add_theme_color(dpg.mvThemeCol_Text, DISABLED_COLOR)
                    dpg.add_theme_color(dpg.mvThemeCol_Button, (45, 45, 48))
        dpg.bind_theme(theme)

    # ---- render loop ----------------------------------------------------------
    def poll(self) -> None:
        """Run queued widget callbacks and updates handed back by the worker."""
        dpg.run_callbacks(dpg.get_callback_queue())
        while True:
            try:
                update = self._ui_updates.get_nowait()
            except queue.Empty:
                break
            update()
        self._jobs = [job for job in self._jobs if not job.done()]

    def render(self, frames: int = 1) -> None:
        for _ in range(frames):
            self.poll()
            dpg.render_dearpygui_frame()

    @property
    def busy(self) -> bool:
        return any(not job.done() for job in self._jobs) or not self._ui_updates.empty()

    def wait(self, timeout: float = 120.0) -> None:
        """Render until background work is finished (for tests and scripted use)."""
        deadline = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f'background work still running after {timeout} s')
            self.render()
            time.sleep(0.01)
        self.render(2)

    def run(self) -> None:
        while dpg.is_dearpygui_running():
            self.render()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)  # the worker touches no widgets
        if self.built:
            dpg.destroy_context()
            self.built = False

    # ---- actions (called by the widget callbacks; tests call them directly) ---
    def refresh_networks(self) -> None:
        """Scan ckpt_root for exported runs; networks without params are disabled."""
        try:
            self.runs = available_runs(self.ckpt_root)
        except (OSError, ValueError) as error:
            self.runs = {network: None for network in models.MODEL_NAMES}
            self.show_error(f'Cannot scan {self.ckpt_root}: {error}')
        for network, run in self.runs.items():
            dpg.configure_item(self.tags['networks'][network], enabled=run is not None)
            dpg.set_value(self.tags['hints'][network],
                          run.name if run is not None else f'not trained: {training_command(network)}')
        if self.network is not None and self.runs.get(self.network) is None:
            self._deselect()
        if not any(self.runs.values()):
            dpg.set_value(self.tags['no_params'],
                          f'No trained params found under {self.ckpt_root}/. Train a network first, e.g. '
                          f'`{training_command("lenet5")}` (fast), then press "Rescan ckpt/".')
            dpg.show_item(self.tags['no_params'])
        else:
            dpg.hide_item(self.tags['no_params'])

    def open_image(self, path: str | Path) -> bool:
        """Show an image file; on failure show the error and keep the previous image."""
        path = Path(path)
        try:
            rgb = images.to_rgb_uint8(images.open_image(path))
        except (OSError, ValueError) as error:
            self.show_error(str(error))
            return False
        dpg.set_value(self.tags['texture'], letterbox_rgba(rgb).ravel())
        dpg.set_value(self.tags['image_name'], f'{path.name}  ({rgb.shape[1]}x{rgb.shape[0]})')
        self.image_path = path
        is_sample = path.resolve().parent == SAMPLES_DIR
        dpg.set_value(self.tags['samples'], path.stem if is_sample else '')
        self.clear_error()
        self._clear_result()
        return True

    def select_network(self, network: str) -> bool:
        """Choose a network; its params load in the background (once)."""
        try:
            network = models.canonical_name(network.lower())
        except ValueError as error:
            self.show_error(str(error))
            return False
        if self.runs.get(network) is None:
            self.show_error(f'{NETWORK_LABELS[network]} has no trained params under {self.ckpt_root}/; '
                            f'train it with `{training_command(network)}`.')
            return False
        self.network = network
        for name, tag in self.tags['networks'].items():
            dpg.set_value(tag, name == network)
        self.clear_error()
        self._clear_result()
        self._show_params()
        if network not in self.predictors:
            self._submit(self._ensure_loaded, network)
        return True

    def predict(self) -> bool:
        """Classify the current image with the current network (in the background)."""
        if self.image_path is None:
            self.show_error('Open an image first (or pick a sample).')
            return False
        if self.network is None:
            self.show_error('Choose a network first.')
            return False
        self.clear_error()
        self._submit(self._predict_job, self.network, self.image_path)
        return True

    def show_error(self, message: str) -> None:
        self.last_error = message
        dpg.set_value(self.tags['error'], f'Error: {message}')
        dpg.show_item(self.tags['error'])
        dpg.set_value(self.tags['status'], 'Error (see message).')

    def clear_error(self) -> None:
        self.last_error = None
        dpg.hide_item(self.tags['error'])

    # ---- widget callbacks -----------------------------------------------------
    def _on_file_dialog(self, sender, app_data, user_data=None) -> None:
        path = app_data.get('file_path_name') if isinstance(app_data, dict) else None
        selections = app_data.get('selections') if isinstance(app_data, dict) else None
        if selections:  # file_path_name can carry the filter's extension; selections are exact
            path = next(iter(selections.values()))
        if path:
            self.open_image(path)

    def _on_open(self, sender=None, app_data=None, user_data=None) -> None:
        dpg.show_item(self.tags['file_dialog'])

    def _on_rescan(self, sender=None, app_data=None, user_data=None) -> None:
        self.refresh_networks()

    def _on_sample(self, sender, app_data, user_data=None) -> None:
        path = sample_images().get(app_data)
        if path is not None:
            self.open_image(path)

    def _on_network(self, sender, app_data, user_data) -> None:
        if not self.select_network(user_data):
            dpg.set_value(sender, False)

    def _on_predict(self, sender=None, app_data=None, user_data=None) -> None:
        self.predict()

    # ---- background work (worker thread; touches no widgets) -------------------
    def _submit(self, function, *args) -> None:
        self._jobs.append(self._worker.submit(self._guarded, function, *args))

    def _guarded(self, function, *args) -> None:
        try:
            function(*args)
        except Exception as error:  # shown in the window; the app keeps running
            message = describe(error)
            self._ui_updates.put(lambda: self.show_error(message))

    def _status(self, text: str) -> None:
        self._ui_updates.put(lambda: dpg.set_value(self.tags['status'], text))

    def _ensure_loaded(self, network: str) -> Predictor | None:
        """The cached predictor, loading and compiling it first if needed (None if that fails)."""
        if network in self.predictors:
            return self.predictors[network]
        label = NETWORK_LABELS[network]
        self._status(f'Loading {label} params...')
        start = time.perf_counter()
        try:
            predictor = self.loader(self.runs[network], self.ckpt_root, conv=self.conv)
            self._status(f'Compiling {label}...')
            predictor.predict_arrays(np.zeros((1, 32, 32, 3), np.uint8))  # compile now, not on Predict
        except Exception as error:  # a damaged export must not take the window down
            message = f'Could not load {label} params from {self.runs[network]}: {describe(error)}'
            self._ui_updates.put(lambda: self._load_failed(network, message))
            return None
        self.predictors[network] = predictor
        seconds = time.perf_counter() - start
        self._status(f'{label} ready (loaded and compiled in {seconds:.1f} s).')
        self._ui_updates.put(self._show_params)
        return predictor

    def _predict_job(self, network: str, path: Path) -> None:
        predictor = self._ensure_loaded(network)
        if predictor is None:
            return
        self._status(f'Predicting with {NETWORK_LABELS[network]}...')
        start = time.perf_counter()
        probabilities = predictor.predict(path)[0]
        seconds = time.perf_counter() - start
        self._ui_updates.put(lambda: self._show_result(network, path, probabilities, seconds))

    # ---- display ----------------------------------------------------------------
    def _load_failed(self, network: str, message: str) -> None:
        if self.network == network:
            self._deselect()
        self.show_error(message)

    def _deselect(self) -> None:
        self.network = None
        for tag in self.tags['networks'].values():
            dpg.set_value(tag, False)
        dpg.set_value(self.tags['params'], 'Params: choose a network.')
        self._clear_result()

    def _show_params(self) -> None:
        network = self.network
        if network is None:
            return
        predictor = self.predictors.get(network)
        if predictor is None:
            run = self.runs.get(network)
            dpg.set_value(self.tags['params'], f'Params: loading {run.name if run else network}...')
        else:
            dpg.set_value(self.tags['params'], f'Params: {predictor.source}')

    def _show_result(self, network: str, path: Path, probabilities: np.ndarray, seconds: float) -> None:
        if network != self.network or path != self.image_path:
            return  # the user changed the choice meanwhile; this result is stale
        self.last_probabilities = probabilities
        class_names = self.predictors[network].class_names
        best = int(np.argmax(probabilities))
        dpg.set_value(self.tags['label'], f'Prediction: {class_names[best]} ({100 * probabilities[best]:.1f}%)')
        dpg.set_value(self.tags['timing'],
                      f'{NETWORK_LABELS[network]} on {path.name}: prediction took {1000 * seconds:.1f} ms')
        self._set_bars(probabilities, best)
        dpg.set_value(self.tags['status'], 'Done.')

    def _clear_result(self) -> None:
        self.last_probabilities = None
        dpg.set_value(self.tags['label'], 'Prediction: -')
        dpg.set_value(self.tags['timing'], '')
        self._set_bars(np.zeros(len(CLASS_NAMES)), None)

    def _set_bars(self, probabilities: np.ndarray, best: int | None) -> None:
        rows = bar_rows(len(probabilities))
        values = [float(p) for p in probabilities]
        top = [value if i == best else 0.0 for i, value in enumerate(values)]
        dpg.set_value(self.tags['bars'], [values, rows])
        dpg.set_value(self.tags['top_bar'], [top, rows])

    def bar_values(self) -> list[float]:
        """The probabilities the bar chart shows, in class order."""
        return [float(v) for v in dpg.get_value(self.tags['bars'])[0][:len(CLASS_NAMES)]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m ui', description='Desktop CIFAR-10 classifier.')
    parser.add_argument('image', nargs='?', help='image file to open at start')
    parser.add_argument('--model', help=f'network to select at start: {list(models.MODEL_NAMES) + ["googlenet"]}')
    parser.add_argument('--ckpt-root', default='ckpt', help='folder holding the run folders (default: ckpt)')
    parser.add_argument('--conv', default='auto', help='convolution implementation: auto|xla|gemm')
    parser.add_argument('--screenshot', metavar='PNG',
                        help='predict (when an image and --model are given), save the window to PNG and exit')
    args = parser.parse_args(argv)
    app = App(args.ckpt_root, conv=args.conv)
    app.build()
    try:
        if args.image:
            app.open_image(args.image)
        if args.model:
            app.select_network(args.model)
        if args.screenshot:
            return save_screenshot(app, args.screenshot, predict=bool(args.image and args.model))
        app.run()
    finally:
        app.close()
    return 0


def save_screenshot(app: App, path: str | Path, *, predict: bool, timeout: float = 300.0) -> int:
    """Render the window (after an optional prediction) and write it to a PNG file."""
    path = Path(path).absolute()
    path.unlink(missing_ok=True)
    app.wait(timeout)
    if predict and app.predict():
        app.wait(timeout)
    app.render(5)
    # The file form; the callback form of output_frame_buffer crashed in testing.
    dpg.output_frame_buffer(file=str(path))
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        app.render()
    app.render(2)
    if not path.exists():
        print(f'error: the screenshot was not written to {path}', file=sys.stderr)
        return 1
    print(f'saved {path}')
    return 1 if app.last_error else 0
