"""The New run page: pick a configured model and its deployment, type or upload texts, queue a job, watch
its queue position and progress; the run opens when it is done."""

from __future__ import annotations

import html
import time

import pandas as pd
import panel as pn

from lens.errors import LensError
from lens.store.core import normalize_tags

from .inputs import check_image, check_texts, texts_from_typed, texts_from_upload
from .session import message_pane, sentence, show_message

__all__ = ["NewRunPage"]


class NewRunPage:
    """See the module docstring."""

    def __init__(self, session):
        self.s = session
        config = session.config
        self.limits = config.limits
        self.model = pn.widgets.Select(name="Model", options={m.title: m.name for m in config.models},
                                       value=config.models[0].name, css_classes=["lens-model"], width=320)
        self.attention = pn.widgets.Select(name="Attention", css_classes=["lens-attention"], width=160)
        self.quant = pn.widgets.Select(name="Weights", css_classes=["lens-quant"], width=160)
        self.model_status = pn.pane.HTML("", css_classes=["lens-model-status"], sizing_mode="stretch_width")
        self.texts = pn.widgets.TextAreaInput(
            name=f"Texts — one input per line (at most {self.limits.inputs_per_job} inputs, "
                 f"{self.limits.tokens_per_input} tokens each)",
            placeholder="The capital of France is Paris.\nAttention sinks form on the first token.",
            height=150, sizing_mode="stretch_width", css_classes=["lens-texts"])
        self.upload = pn.widgets.FileInput(accept=".txt,.jsonl,.json", css_classes=["lens-upload"])
        self.image = pn.widgets.FileInput(accept="image/*", css_classes=["lens-image"])
        self.tags = pn.widgets.TextInput(name="Tags", placeholder="comma separated", css_classes=["lens-new-tags"], width=240)
        self.submit = pn.widgets.Button(name="Run", button_type="primary", css_classes=["lens-submit"], width=120)
        self.message = message_pane("lens-new-message")
        self.job_status = pn.pane.HTML("", css_classes=["lens-job-status"], sizing_mode="stretch_width")
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, sizing_mode="stretch_width",
                                               css_classes=["lens-job-progress"])
        self.cancel = pn.widgets.Button(name="Cancel job", visible=False, css_classes=["lens-cancel"], width=120)
        self.jobs = pn.widgets.Tabulator(self._jobs_frame([]), disabled=True, show_index=False, height=220,
                                         sizing_mode="stretch_width", css_classes=["lens-my-jobs"], layout="fit_data_fill")
        self.uploaded: list[str] = []
        self.upload_error: str | None = None
        self.image_error: str | None = None
        self.watching: str | None = None

        self.model.param.watch(lambda e: self._model_changed(), "value")
        self.upload.param.watch(self._on_upload, "value")
        self.image.param.watch(self._on_image, "value")
        self.submit.on_click(self._on_submit)
        self.cancel.on_click(self._on_cancel)
        self._model_changed()
        self._refresh_jobs()
        session.every(1, self._follow_job)
        session.every(5, self._refresh_status, page="new")
        self.panel = pn.Column(
            pn.Row(self.model, self.attention, self.quant),
            self.model_status,
            self.texts,
            pn.Row(pn.pane.HTML("<label>…or upload a text file (.txt: one input per line; .jsonl; .json list)</label>"),
                   self.upload),
            pn.Row(pn.pane.HTML("<label>Image (vision-language models only)</label>"), self.image),
            pn.Row(self.tags, self.submit),
            self.message, self.job_status, self.progress, self.cancel,
            pn.pane.HTML("<h4>Your recent jobs</h4>"), self.jobs,
            sizing_mode="stretch_width",
        )

    # -- model choice -------------------------------------------------------------------------------
    def _model_changed(self) -> None:
        spec = self.s.config.model(self.model.value)
        self.attention.options = list(spec.attention)
        self.attention.value = spec.attention[0]
        self.quant.options = {("full precision" if q == "none" else q): q for q in spec.quant}
        self.quant.value = spec.quant[0]
        self._refresh_status()

    def _refresh_status(self) -> None:
        name = self.model.value
        workers = [w for w in self.s.store.workers.list(alive_only=True)]
        ready = [w for w in workers if name in w.models and self.quant.value in w.models[name].get("quant", [])]
        info = next((w.models[name] for w in ready), None)
        if info:
            text = (f"{html.escape(info.get('model_id', name))}: {info.get('family')} · {info.get('n_layers')} layers · "
                    f"{info.get('n_heads')} heads · {'causal' if info.get('causal') else 'bidirectional'} · at most "
                    f"{info.get('tokens_per_input')} tokens per input — ready on {len(ready)} worker(s)")
        elif any(w.status == "loading" for w in workers):
            text = "The workers are loading their models; a job queued now starts when they are ready."
        else:
            errors = {e for w in workers for e in w.models.get(name, {}).get("errors", {}).values()}
            text = ("No worker has this model loaded" + (f": {html.escape(next(iter(errors)))}" if errors else
                    " yet; jobs wait in the queue until a worker that has it starts."))
        self.model_status.object = f"<small>{text}</small>"

    # -- inputs -------------------------------------------------------------------------------------
    def _on_upload(self, event) -> None:
        self.uploaded, self.upload_error = [], None
        if event.new is None:
            return
        try:
            self.uploaded = texts_from_upload(self.upload.filename or "", event.new, self.limits)
        except LensError as exc:
            self.upload_error = str(exc)
            return show_message(self.message, f"Upload refused: {self.upload_error}", "danger")
        show_message(self.message, f"{self.upload.filename}: {len(self.uploaded)} inputs read.", "info")

    def _on_image(self, event) -> None:
        self.image_error = None
        if event.new is None:
            return
        try:
            info = check_image(self.image.filename or "", event.new, self.limits)
        except LensError as exc:
            self.image_error = f"Image refused: {exc}"
            return show_message(self.message, self.image_error, "danger")
        # a valid image — but the configured models are language models: say so rather than drop it silently
        self.image_error = (f"{self.image.filename} ({info.format}, {info.width} × {info.height}) is a valid image, but "
                            "none of the configured models reads images; image runs need a vision-language model")
        show_message(self.message, self.image_error, "warning")

    def _on_submit(self, _=None) -> None:
        if self.upload_error:
            return show_message(self.message, f"Upload refused: {self.upload_error}", "danger")
        if self.image_error:
            return show_message(self.message, self.image_error, "danger")
        if self.watching:
            return show_message(self.message, "Your previous job is still in the queue; wait for it or cancel it.", "warning")
        try:
            texts = check_texts(texts_from_typed(self.texts.value) + self.uploaded, self.limits)
            spec = self.s.config.model(self.model.value)
            job = self.s.store.jobs.submit(
                self.s.user, "trace", spec.name,
                {"texts": texts, "attention": self.attention.value, "quant": self.quant.value,
                 "tags": normalize_tags(self.tags.value)},
                max_active=self.limits.jobs_per_user)
        except LensError as exc:
            return show_message(self.message, f"Not queued: {exc}", "danger")
        self.watching = job.id
        show_message(self.message, f"Job {job.id} queued ({len(texts)} inputs).", "info")
        self._follow_job()
        self._refresh_jobs()

    def _on_cancel(self, _=None) -> None:
        if self.watching:
            try:
                self.s.store.jobs.cancel(self.watching, by=self.s.user, is_admin=self.s.is_admin)
            except LensError as exc:
                show_message(self.message, sentence(exc), "danger")
            self._follow_job()

    # -- following the job --------------------------------------------------------------------------
    def _follow_job(self) -> None:
        if not self.watching:
            return
        job = self.s.store.jobs.get(self.watching)
        with pn.io.hold():
            self.progress.visible = self.cancel.visible = not job.final
            self.progress.value = int(100 * job.progress)
            if job.status == "queued":
                position = self.s.store.jobs.position(job.id)
                state = f"queued — position {position} in the queue"
            elif job.status == "running":
                state = f"running — {html.escape(job.message)} ({100 * job.progress:.0f}%)"
            else:
                state = job.status
            took = f" in {job.finished - job.created:.1f} s" if job.finished else ""
            self.job_status.object = (f"<span class='lens-job' data-job='{job.id}' data-status='{job.status}'>"
                                      f"Job {job.id}: {state}{took}</span>")
            if job.final:
                self.watching = None
                self._refresh_jobs()
                if job.status == "done" and job.result_id:
                    show_message(self.message, f"Run {job.result_id} is ready; it is open on the Runs page.", "success")
                    runs = self.s.page("runs")
                    self.s.shared.invalidate()
                    runs.refresh()
                    if runs.open(job.result_id):
                        show_message(runs.message, f"Run {job.result_id} (job {job.id}) is ready.", "success")
                elif job.status == "failed":
                    show_message(self.message, f"Job {job.id} failed: {job.error}", "danger")
                else:
                    show_message(self.message, f"Job {job.id} was cancelled.", "warning")

    @staticmethod
    def _jobs_frame(jobs) -> pd.DataFrame:
        return pd.DataFrame(
            [[j.id, time.strftime("%H:%M:%S", time.gmtime(j.created)), j.model, j.params.get("attention", ""),
              j.params.get("quant", ""), len(j.params.get("texts", [])), j.status, j.result_id or "", (j.error or "")[:160]]
             for j in jobs],
            columns=["job", "queued (UTC)", "model", "attention", "weights", "inputs", "status", "run", "error"])

    def _refresh_jobs(self) -> None:
        self.jobs.value = self._jobs_frame(self.s.store.jobs.list(owner=self.s.user, limit=20))
