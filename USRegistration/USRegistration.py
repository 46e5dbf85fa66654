"""USRegistration: deformable registration of 3D/4D ultrasound (breathing motion of liver sequences).

Thin GUI over the MRML layer (`us3dmrml.registration`): the moving volume (default: the exhale
frame) is registered to a fixed volume or to every frame of a sequence, optionally after
despeckling both; outputs are new warped volumes and grid transforms; the panel lists MSE
before and after, SMPI of the pre-processing and the fraction of folding voxels.
"""

import importlib.util
import os
import sys
from typing import Annotated, Optional

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("us3d") is None and os.path.isdir(os.path.join(_SOURCE_ROOT, "us3d")):
    sys.path.append(_SOURCE_ROOT)

from us3d.dependencies import cuda_may_be_available, dependency_problem  # noqa: E402  (no torch import)
from us3d.options import (DEFAULT_REFINE_STEPS, DEVICES, REGISTRATION_METHODS,  # noqa: E402  (no torch import)
                          REGISTRATION_PREPROCESSING)
from USDespeckle import ModuleWidgetMixin, runSelfTestScenarios, slicerTooOld  # noqa: E402  (a dependency of this module: loaded first)


class USRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("US Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = ["Sequences", "USDespeckle"]
        self.parent.contributors = ["US3D contributors"]
        self.parent.helpText = _(
            "Deformable registration of 3D ultrasound volumes: the moving volume (for a 4D liver sequence, "
            "the exhale frame) is warped onto a fixed volume or onto every frame of a sequence. Speckle can be "
            "reduced first (OBNLM or U-Net). Outputs: warped volume(s) and the displacement as grid transforms. "
            "Methods: VoxelMorph (the bundled network, then a short per-pair refinement; well under a second "
            "per frame), the refinement from an FFT translation without the network, or multi-resolution demons "
            "(SimpleITK; seconds per frame). Advanced: the number of refinement steps (0: the network alone, as "
            "in the VoxelMorph paper).")
        self.parent.helpText += _(
            ' <a href="https://github.com/us3d/SlicerUS3D#use-in-3d-slicer">Documentation</a>: settings, outputs, '
            "the minimum Slicer version and how dependencies are installed.")
        self.parent.acknowledgementText = _("VoxelMorph: Balakrishnan et al., IEEE TMI 2019. Demons: SimpleITK. "
                                            "OBNLM: Coupe et al., IEEE TIP 2009.")


@parameterNodeWrapper
class USRegistrationParameterNode:
    """Module settings, saved with the scene.

    fixedVolume: the fixed volume, or the proxy volume of a sequence browser (allFrames: every frame).
    movingVolume: the volume to warp (for 4D, typically the exhale frame).
    method, preprocessing, device: see us3d.options.
    refineSteps: per-pair refinement steps after the network or translation (0: the network alone).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    allFrames: bool = True
    movingVolume: vtkMRMLScalarVolumeNode
    method: Annotated[str, Choice(list(REGISTRATION_METHODS))] = "voxelmorph"
    preprocessing: Annotated[str, Choice(list(REGISTRATION_PREPROCESSING))] = "none"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    refineSteps: Annotated[int, WithinRange(0, 500)] = DEFAULT_REFINE_STEPS
    warpedVolume: vtkMRMLScalarVolumeNode


class USRegistrationWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runMessage = ""  # what the last run said; shown whenever Apply has nothing to object to

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi("UI/USRegistration.ui", USRegistrationLogic())
        self.ui.resultsTable.setHorizontalHeaderLabels(
            [_("frame"), _("MSE before"), _("MSE after"), _("SMPI"), _("folding (%)"), _("time (s)")])
        self.ui.installButton.visible = bool(dependency_problem())
        self.setupBackgroundRun()
        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.isRunning() or not self._parameterNode:
            return
        reason = self.logic.whyNotApplicable(self._parameterNode)
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Register the moving volume to the fixed volume or frames")
        self.ui.statusLabel.text = reason or self._runMessage
        params = self._parameterNode
        self.ui.compareButton.enabled = None not in (params.fixedVolume, params.movingVolume, params.warpedVolume)

    def onApplyButton(self) -> None:
        if self.isRunning():
            self._runMessage = self.cancelRun()
            self._checkCanApply()
            return
        self._runMessage = ""
        self.applyOrCancel(lambda: self.logic.startProcess(self._parameterNode), _("Registration failed."))

    def lockedWhileRunning(self) -> list:
        return [self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.installButton,
                self.ui.compareButton]

    def finishRun(self, job) -> None:
        self._showResults(self.logic.finishProcess(self._parameterNode, job))

    def _showResults(self, run) -> None:
        table = self.ui.resultsTable
        table.setRowCount(len(run.results))
        for row, result in enumerate(run.results):
            smpi = "-" if result.smpi is None else f"{result.smpi:.3f}"
            texts = (str(row), f"{result.mse_before:.4f}", f"{result.mse_after:.4f}", smpi,
                     f"{100 * result.folding:.3f}", f"{result.seconds:.1f}")
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        if any(result.resampled for result in run.results):
            self._runMessage = _("The moving volume was on another grid: it was resampled onto the fixed grid.")
        if len(run.results) > 1:
            from USDespeckle import USDespeckleLogic

            USDespeckleLogic.showFramePlot(f"{run.warped_node.GetName()} MSE",
                                           {_("MSE before"): [r.mse_before for r in run.results],
                                            _("MSE after"): [r.mse_after for r in run.results]}, _("MSE"))

    def onCompareButton(self) -> None:
        params = self._parameterNode
        self.logic.showFixedMovingWarped(params.fixedVolume, params.movingVolume, params.warpedVolume)

    def onInstallButton(self) -> None:
        from USDespeckle import USDespeckleLogic  # one installer for the extension's modules

        try:
            with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
                USDespeckleLogic.installDependencies()
        finally:  # the state is shown afresh after a failed install too
            self.ui.installButton.visible = bool(dependency_problem())
            self._checkCanApply()


class USRegistrationLogic(ScriptedLoadableModuleLogic):
    """GUI-free: raises exceptions, takes progress and cancel callbacks."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return USRegistrationParameterNode(super().getParameterNode())

    def whyNotApplicable(self, params) -> Optional[str]:
        """None when Apply can run, else the reason (shown as the button's tooltip)."""
        if slicerTooOld():
            return slicerTooOld()
        if dependency_problem():
            return dependency_problem()
        from us3d.errors import InputError
        from us3dmrml.nodes import check_volume_node

        for label, node in ((_("fixed"), params.fixedVolume), (_("moving"), params.movingVolume)):
            try:
                check_volume_node(node)
            except InputError as error:
                return f"{label}: {error}"
        if params.device == "cuda" and not cuda_may_be_available():
            return _("No CUDA GPU is available; choose auto or cpu")
        return None

    @staticmethod
    def settings(params):
        """The us3d RegistrationSettings of the parameter node."""
        from us3d.registration.pairs import RegistrationSettings

        return RegistrationSettings(method=params.method, preprocessing=params.preprocessing,
                                    refine_steps=int(params.refineSteps), device=params.device)

    def startProcess(self, params):
        """Start the registration in a background process; returns the job for `finishProcess` (poll
        `job.run`; `job.run.cancel()` stops it)."""
        from USDespeckle import USDespeckleLogic
        from us3dmrml.nodes import sequence_of_proxy_node
        from us3dmrml.registration import start_registration

        sequence, browser = sequence_of_proxy_node(slicer.mrmlScene, params.fixedVolume)
        allFrames = sequence is not None and params.allFrames
        return start_registration(sequence if allFrames else params.fixedVolume, params.movingVolume,
                                  self.settings(params), sequence=allFrames,
                                  python=USDespeckleLogic.pythonExecutable(), browser_node=browser if allFrames else None)

    def finishProcess(self, params, job):
        """The finished job's outputs as new nodes (the warped one selected); raises the worker's error."""
        from us3dmrml.registration import finish_registration

        run = finish_registration(slicer.mrmlScene, job, slicer.modules.sequences.logic())
        params.warpedVolume = job.browser.GetProxyNode(run.warped_node) if job.browser is not None else run.warped_node
        return run

    def process(self, params, progress=None, cancel=None):
        """Register into new nodes in this process; returns the run, or None if cancelled."""
        from us3d.errors import Cancelled
        from us3dmrml.nodes import sequence_of_proxy_node
        from us3dmrml.registration import register_sequence_node, register_volume_nodes

        scene = slicer.mrmlScene
        sequence, browser = sequence_of_proxy_node(scene, params.fixedVolume)
        settings = self.settings(params)
        try:
            if sequence is not None and params.allFrames:
                run = register_sequence_node(scene, sequence, params.movingVolume, settings, progress, cancel,
                                             browser_node=browser, sequences_logic=slicer.modules.sequences.logic())
                params.warpedVolume = browser.GetProxyNode(run.warped_node)
            else:
                run = register_volume_nodes(scene, params.fixedVolume, params.movingVolume, settings, cancel)
                params.warpedVolume = run.warped_node
        except Cancelled:
            return None
        return run

    @staticmethod
    def showFixedMovingWarped(fixedVolume, movingVolume, warpedVolume) -> None:
        """Fixed | moving | warped in three linked axial slice views."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        for viewName, volume in (("Red", fixedVolume), ("Yellow", movingVolume), ("Green", warpedVolume)):
            widget = layoutManager.sliceWidget(viewName)
            composite = widget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)
            widget.mrmlSliceNode().SetOrientation("Axial")
        slicer.util.resetSliceViews()


class USRegistrationTest(ScriptedLoadableModuleTest):
    """The scenarios of us3dmrml.selftests, on Slicer's scene (pytest runs them on slicer-core)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        runSelfTestScenarios(self, "USRegistration", "REGISTRATION_SCENARIOS")
