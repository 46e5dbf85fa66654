"""USDespeckle: speckle reduction of 3D and 4D ultrasound volumes (OBNLM or a 3D dense U-Net).

Thin GUI over the MRML layer (`us3dmrml`) and the logic layer (`us3d`): widgets are bound to a
parameter node; Apply becomes Cancel while frames are processed; the self-test runs the same
scenarios that the project's pytest suite runs on slicer-core.
"""

import importlib.util
import os
import sys
import time
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# In the source tree the shared packages (us3d, us3dmrml) sit one folder up; an installed
# extension puts them beside this file.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("us3d") is None and os.path.isdir(os.path.join(_SOURCE_ROOT, "us3d")):
    sys.path.append(_SOURCE_ROOT)

from us3d.dependencies import (PIP_REQUIREMENTS, REQUIREMENTS_FILE, TORCH_REQUIREMENT,  # noqa: E402  (no torch)
                               cuda_may_be_available, dependency_problem, missing_packages, torch_version_problem)
from us3d.options import DEVICES, OBNLM_MODES  # noqa: E402  (no torch import)
from us3d.resources import bundled_model_names  # noqa: E402

METHODS = ["OBNLM", "U-Net"]
MODELS = bundled_model_names() or ["unet-obnlm"]


class USDespeckle(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("US Despeckle")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = ["Sequences", "Plots"]
        self.parent.contributors = ["US3D contributors"]
        self.parent.helpText = _(
            "Speckle reduction of 3D ultrasound volumes and of every frame of 4D sequences: the OBNLM "
            "non-local means filter, or a 3D dense U-Net trained to reproduce it (unet-obnlm) or to recover "
            "the speckle-free tissue (unet-sim). Pick the volume shown by a sequence browser to process all "
            "frames. The input is never changed; the output is a new volume or sequence.")
        self.parent.helpText += _(
            ' <a href="https://github.com/us3d/SlicerUS3D#use-in-3d-slicer">Documentation</a>: settings, outputs, '
            "the minimum Slicer version and how dependencies are installed.")
        self.parent.acknowledgementText = _(
            "OBNLM: Coupe et al., IEEE TIP 2009. The U-Net follows the 3D dense U-Net for ultrasound "
            "despeckling of 4D liver sequences. Sample data: PLUS toolkit (BSD-3-Clause), ITKUltrasound (Apache-2.0).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Two data sets in the Sample Data module's "Ultrasound" category: the project's simulated 4D
    liver sequence with its true motion (simulated at first use, then cached) and a real
    3D ultrasound volume of a spine phantom (shipped with the extension)."""
    import SampleData

    from us3d.resources import RESOURCES

    spine = RESOURCES / "SampleData" / "SpinePhantomFreehandReconstructed.mha"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Ultrasound", sampleName="US3DSpinePhantom", uris=spine.as_uri(), fileNames=spine.name,
        nodeNames="US3D spine phantom", loadFileTypes="VolumeFile")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Ultrasound", sampleName="US3DLiverPhantom4D", uris="us3d-simulated-liver-phantom",
        fileNames="bmode.seq.nrrd", nodeNames="US3D liver phantom", customDownloader=loadLiverPhantom)


def loadLiverPhantom(*source) -> None:
    """Sample Data's loader of the simulated liver sequence (called with the data source in recent
    Slicer, with nothing in older ones): the sequence, its true motion as grid transforms and one
    browser, shown in the views."""
    if dependency_problem():
        slicer.util.errorDisplay(dependency_problem())
        return
    from us3dmrml.sampledata import load_liver_phantom

    with slicer.util.tryWithErrorDisplay(_("Simulating the liver sequence failed."), waitCursor=True):
        cache = slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()
        browser, bmode, _truth = load_liver_phantom(slicer.mrmlScene, cache, slicer.modules.sequences.logic())
        slicer.util.setSliceViewerLayers(background=browser.GetProxyNode(bmode), fit=True)


@parameterNodeWrapper
class USDespeckleParameterNode:
    """Module settings, saved with the scene.

    inputVolume: the volume (or the proxy volume of a sequence browser, for 4D).
    allFrames: with a sequence proxy, process every frame into a new sequence.
    method: OBNLM or U-Net. mode, searchRadius (M), blockRadius (alpha), h: OBNLM parameters.
    model: bundled U-Net. device: auto, cpu or cuda.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    allFrames: bool = True
    method: Annotated[str, Choice(METHODS)] = "OBNLM"
    mode: Annotated[str, Choice(list(OBNLM_MODES))] = "slicewise"
    searchRadius: Annotated[int, WithinRange(1, 15)] = 3
    blockRadius: Annotated[int, WithinRange(1, 5)] = 1
    h: Annotated[float, WithinRange(0.05, 10.0)] = 0.7
    model: Annotated[str, Choice(MODELS)] = MODELS[0]
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputVolume: vtkMRMLScalarVolumeNode


#: The oldest 3D Slicer the modules support (its Python 3.12 runs us3d and the pip requirements).
MINIMUM_SLICER = (5, 10)


def slicerTooOld() -> str:
    """Why this Slicer cannot run the modules ("" when it can)."""
    version = (slicer.app.majorVersion, slicer.app.minorVersion)
    if version < MINIMUM_SLICER:
        return _("This module needs 3D Slicer {major}.{minor} or newer (this is {this}).").format(
            major=MINIMUM_SLICER[0], minor=MINIMUM_SLICER[1], this=f"{version[0]}.{version[1]}")
    return ""


class BackgroundRunMixin:
    """Apply / Cancel of a background run for a module widget (USDespeckle and USRegistration).

    Apply calls a start function that returns a job with a `run` (us3dmrml.background.BackgroundRun);
    a QTimer polls it into the progress bar; Apply becomes Cancel, which kills the process; the
    widgets of `lockedWhileRunning()` are disabled meanwhile; `finishRun(job)` makes the outputs.
    The widget provides `ui.applyButton`, `ui.progressBar`, `ui.statusLabel`, `_checkCanApply()`,
    `lockedWhileRunning()` and `finishRun(job)`, and calls `setupBackgroundRun()` in setup.
    """

    def setupBackgroundRun(self) -> None:
        self._job = None
        self._failureTitle = ""
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

    def isRunning(self) -> bool:
        return getattr(self, "_job", None) is not None

    def applyOrCancel(self, start, failureTitle: str) -> None:
        if self.isRunning():
            self.cancelRun()
            return
        self.ui.statusLabel.text = ""
        self.ui.progressBar.setValue(0)
        self._failureTitle = failureTitle
        with slicer.util.tryWithErrorDisplay(failureTitle, waitCursor=True):
            self._job = start()
        self._setRunning(True)
        self._timer.start()

    def _setRunning(self, running: bool) -> None:
        for widget in self.lockedWhileRunning():
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        if not running:
            self._checkCanApply()

    def _onTimer(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        progress = job.run.progress()
        if progress is not None:
            done, total = progress
            self.ui.progressBar.setMaximum(total)
            self.ui.progressBar.setValue(done)
            self.ui.progressBar.setFormat(_("frame {done}/{total}").format(done=done, total=total))
        if not job.run.poll():
            return
        self._timer.stop()
        self._job = None
        try:
            with slicer.util.tryWithErrorDisplay(self._failureTitle, waitCursor=True):
                self.finishRun(job)
        finally:
            self._setRunning(False)

    def cancelRun(self) -> str:
        """Kill the background run, if any: nothing is added to the scene. Returns the status text."""
        if not self.isRunning():
            return ""
        self._timer.stop()
        job, self._job = self._job, None
        job.run.cancel()
        self.ui.progressBar.setValue(0)
        message = _("Cancelled; nothing was added to the scene.")
        self.ui.statusLabel.text = message
        self._setRunning(False)
        return message


class ModuleWidgetMixin(BackgroundRunMixin):
    """The scripted-module template's widget life cycle, shared by USDespeckle and USRegistration:
    the parameter node is bound to the GUI on enter and released on exit, a scene close cancels a
    live run first (its nodes would belong to the closed scene), cleanup cancels and stops observing.
    The widget provides `initializeParameterNode()` and `_checkCanApply()`; `onGuiConnected()` runs
    after each `connectGui` (which refills combo boxes)."""

    def setupModuleUi(self, uiFile: str, logic) -> None:
        """Load the .ui file into the panel, keep the logic, observe scene closes and connect the
        Apply, Compare and Install buttons to onApplyButton, onCompareButton and onInstallButton."""
        uiWidget = slicer.util.loadUI(self.resourcePath(uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)

    def cleanup(self) -> None:
        self.cancelRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()  # its nodes would belong to the scene being closed
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.onGuiConnected()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onGuiConnected(self) -> None:
        pass


class USDespeckleWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi("UI/USDespeckle.ui", USDespeckleLogic())
        self.ui.resultsTable.setHorizontalHeaderLabels([_("frame"), _("SMPI"), _("time (s)"), _("device")])
        self.setupBackgroundRun()
        self._updateDependencyState()
        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def onGuiConnected(self) -> None:
        self._updateDeviceChoices()  # connectGui has just refilled the device list

    def _updateDependencyState(self) -> None:
        problem = dependency_problem()
        self.ui.installButton.visible = bool(problem) and not slicerTooOld()
        self.ui.statusLabel.text = slicerTooOld() or problem or ""
        self._updateDeviceChoices()

    def _updateDeviceChoices(self) -> None:
        """Grey out "cuda" when PyTorch sees no GPU (again after every refill of the list)."""
        cudaAvailable = not dependency_problem() and self.logic.cudaAvailable()
        index = self.ui.deviceComboBox.findText("cuda")
        item = self.ui.deviceComboBox.model().item(index) if index >= 0 else None
        if item is not None:
            item.setEnabled(cudaAvailable)
            item.setToolTip("" if cudaAvailable else _("No CUDA GPU is available to PyTorch"))

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.isRunning() or not self._parameterNode:
            return
        params = self._parameterNode
        self.ui.obnlmGroupBox.enabled = params.method == "OBNLM"
        self.ui.unetGroupBox.enabled = params.method == "U-Net"
        reason = self.logic.whyNotApplicable(params)
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Despeckle the input into a new volume or sequence")
        self.ui.compareButton.enabled = params.inputVolume is not None and params.outputVolume is not None

    def onApplyButton(self) -> None:
        self.applyOrCancel(lambda: self.logic.startProcess(self._parameterNode), _("Despeckling failed."))

    def lockedWhileRunning(self) -> list:
        return [self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.installButton,
                self.ui.compareButton]

    def finishRun(self, job) -> None:
        self._showResults(self.logic.finishProcess(self._parameterNode, job))

    def _showResults(self, run) -> None:
        table = self.ui.resultsTable
        table.setRowCount(len(run.smpi))
        for row, (smpi, seconds) in enumerate(zip(run.smpi, run.seconds_per_frame)):
            for column, text in enumerate((str(row), f"{smpi:.3f}", f"{seconds:.2f}", run.device)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self.ui.statusLabel.text = _("{method}: {n} frame(s), median {t:.2f} s per frame on {device}.").format(
            method=run.method, n=len(run.smpi), t=sorted(run.seconds_per_frame)[len(run.smpi) // 2],
            device=run.device) + "".join("\n" + _("Warning: ") + message for message in run.warnings)
        if len(run.smpi) > 1:
            self.logic.showFramePlot(f"{run.output_node.GetName()} SMPI", {_("SMPI"): run.smpi}, _("SMPI"))

    def onCompareButton(self) -> None:
        self.logic.showSideBySide(self._parameterNode.inputVolume, self._parameterNode.outputVolume)

    def onInstallButton(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
                self.logic.installDependencies()
        finally:  # the state is shown afresh after a failed install too
            self._updateDependencyState()
            self._checkCanApply()


class USDespeckleLogic(ScriptedLoadableModuleLogic):
    """GUI-free: raises exceptions, takes progress and cancel callbacks."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return USDespeckleParameterNode(super().getParameterNode())

    @staticmethod
    def cudaAvailable() -> bool:
        """Without importing torch on the GUI thread (see us3d.dependencies.cuda_may_be_available)."""
        return cuda_may_be_available()

    @staticmethod
    def installDependencies() -> None:
        """PyTorch through the PyTorch extension (its own choice of CUDA build), the rest with pip from
        Resources/requirements.txt (lower bounds that live with Slicer's own packages); only on the
        user's click, never at import."""
        if importlib.util.find_spec("torch") is None or torch_version_problem():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension from the Extensions Manager first.")) from None
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                                      torchVersionRequirement=TORCH_REQUIREMENT)
            if installed is None:
                raise RuntimeError(_("PyTorch was not installed."))
            if torch_version_problem():  # what pip left installed, read from its metadata
                raise RuntimeError(torch_version_problem())
        try:
            import slicer.pydeps  # Slicer >= 5.11: checks versions too, and installs only what is needed
        except ImportError:
            missing = [requirement for name, requirement in PIP_REQUIREMENTS.items() if name in missing_packages()]
            if missing:
                slicer.util.pip_install(missing)
        else:
            slicer.pydeps.pip_ensure(slicer.pydeps.load_requirements(str(REQUIREMENTS_FILE)), requester="US3D")

    def whyNotApplicable(self, params) -> Optional[str]:
        """None when Apply can run, else the reason (shown as the button's tooltip)."""
        if slicerTooOld():
            return slicerTooOld()
        if dependency_problem():
            return dependency_problem()
        from us3d.errors import InputError
        from us3dmrml.nodes import check_volume_node

        try:
            check_volume_node(params.inputVolume)
        except InputError as error:
            return str(error)
        if params.device == "cuda" and not self.cudaAvailable():
            return _("No CUDA GPU is available; choose auto or cpu")
        return None

    def settings(self, params):
        from us3d.despeckling import ObnlmSettings, UnetSettings

        if params.method == "U-Net":
            return UnetSettings(params.model)
        return ObnlmSettings(params.mode, params.searchRadius, params.blockRadius, params.h)

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher for child processes (sys.executable outside Slicer)."""
        import shutil

        return shutil.which("PythonSlicer") or sys.executable

    def startProcess(self, params):
        """Start despeckling the input (every frame of its sequence, with allFrames) in a background
        process; returns the job for `finishProcess` (poll `job.run`; `job.run.cancel()` stops it)."""
        from us3dmrml.despeckle import start_despeckle
        from us3dmrml.nodes import sequence_of_proxy_node

        sequence, browser = sequence_of_proxy_node(slicer.mrmlScene, params.inputVolume)
        allFrames = sequence is not None and params.allFrames
        return start_despeckle(sequence if allFrames else params.inputVolume, self.settings(params), params.device,
                               sequence=allFrames, python=self.pythonExecutable(),
                               browser_node=browser if allFrames else None)

    def finishProcess(self, params, job):
        """The finished job's output as new nodes (selected as the output); raises the worker's error."""
        from us3dmrml.despeckle import finish_despeckle

        if job.browser is not None:
            run = finish_despeckle(slicer.mrmlScene, job, slicer.modules.sequences.logic())
            params.outputVolume = job.browser.GetProxyNode(run.output_node)
        else:
            run = finish_despeckle(slicer.mrmlScene, job)
            params.outputVolume = run.output_node
        return run

    def process(self, params, progress=None, cancel=None):
        """Despeckle into new nodes; returns the run (output, SMPI, times), or None if cancelled."""
        from us3d.despeckling import Cancelled
        from us3dmrml.despeckle import despeckle_sequence_node, despeckle_volume_node
        from us3dmrml.nodes import sequence_of_proxy_node

        scene = slicer.mrmlScene
        sequence, browser = sequence_of_proxy_node(scene, params.inputVolume)
        start = time.time()
        try:
            if sequence is not None and params.allFrames:
                run = despeckle_sequence_node(scene, sequence, self.settings(params), params.device, progress, cancel,
                                              browser_node=browser, sequences_logic=slicer.modules.sequences.logic())
                params.outputVolume = browser.GetProxyNode(run.output_node)
            else:
                run = despeckle_volume_node(scene, params.inputVolume, self.settings(params), params.device,
                                            progress, cancel)
                params.outputVolume = run.output_node
        except Cancelled:
            return None
        slicer.util.showStatusMessage(_("Despeckled in {t:.1f} s").format(t=time.time() - start), 3000)
        return run

    @staticmethod
    def showFramePlot(name: str, figures: dict, yTitle: str) -> None:
        """Per-frame figures as a Slicer plot, shown in the layout's plot view."""
        from us3dmrml.plots import frame_plot

        chart = frame_plot(slicer.mrmlScene, name, figures, yTitle)
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    @staticmethod
    def showSideBySide(inputVolume, outputVolume) -> None:
        """Input | output in two linked slice views."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, volume in (("Red", inputVolume), ("Yellow", outputVolume)):
            composite = layoutManager.sliceWidget(viewName).mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)
            sliceNode = layoutManager.sliceWidget(viewName).mrmlSliceNode()
            sliceNode.SetOrientation("Axial")
        slicer.util.resetSliceViews()


def runSelfTestScenarios(test, moduleName: str, scenariosName: str) -> None:
    """Run the scenarios listed as `scenariosName` in us3dmrml.selftests on Slicer's scene, each on a
    cleared scene; on a Slicer that cannot run them (too old, dependencies missing) say why and pass,
    so a fresh install or the extension build farm does not fail on an import."""
    if slicerTooOld() or dependency_problem():
        test.delayDisplay(f"{moduleName} self-test skipped: " + (slicerTooOld() or dependency_problem()))
        return
    import us3dmrml.selftests

    for scenario, needsSequencesLogic in getattr(us3dmrml.selftests, scenariosName):
        test.setUp()
        test.delayDisplay(f"Running {scenario.__name__}")
        if needsSequencesLogic:
            scenario(slicer.mrmlScene, slicer.modules.sequences.logic())
        else:
            scenario(slicer.mrmlScene)
    test.delayDisplay(f"{moduleName} self-test passed")


class USDespeckleTest(ScriptedLoadableModuleTest):
    """The scenarios of us3dmrml.selftests, on Slicer's scene (pytest runs them on slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        runSelfTestScenarios(self, "USDespeckle", "DESPECKLE_SCENARIOS")
