"""Safety knowledge for EHD answer refinement: a JSONL of short passages, retrieved by embedding similarity.

Equilibrate RLHF observed that explicit-harm (EHD) prompts go wrong because the model lacks the knowledge to answer
them *safely*, not because it lacks refusals; ``equi guard --refine-ehd`` therefore puts the nearest passages of a
knowledge set in front of the prompt. A knowledge file is one JSON object a line with a ``text`` (required) and
optional ``id``, ``title``, ``category`` and ``source``.

The bundled set (``curation/resources/safety_knowledge.jsonl``, card ``data_cards/safety_knowledge.md``) is a demo:
one passage per harm area, written for equi and keyed by the harm categories of permissively licensed benchmarks in
``shared/data`` (HarmBench MIT, JailbreakBench MIT, StrongREJECT MIT). :func:`build_bundled_knowledge` rebuilds it
and checks that every category of those sources is covered.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from equi.errors import UsageError
from equi.jsonl import iter_json_lines

RESOURCE = "safety_knowledge.jsonl"


class KnowledgeError(UsageError):
    """A knowledge file that cannot be used; the message names the file and line."""


@dataclass
class Passage:
    id: str
    text: str
    title: str | None = None
    category: str | None = None
    source: str | None = None


def bundled_knowledge_path() -> Path:
    with resources.as_file(resources.files("curation") / "resources" / RESOURCE) as path:
        return Path(path)


def read_knowledge(path: str | Path | None = None) -> list[Passage]:
    """Passages of a knowledge JSONL (``None`` = the bundled set); a bad line is an error naming its line."""
    path = Path(path) if path is not None else bundled_knowledge_path()
    if not path.is_file():
        raise KnowledgeError(f"knowledge file not found: {path}")
    passages: list[Passage] = []
    for number, obj in iter_json_lines(path, KnowledgeError):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise KnowledgeError(f"{path}:{number}: each line needs a non-empty string field 'text'")
        passages.append(Passage(id=str(obj.get("id", f"{path.name}:{number}")), text=text.strip(),
                                title=obj.get("title"), category=obj.get("category"), source=obj.get("source")))
    if not passages:
        raise KnowledgeError(f"{path}: no passages")
    return passages


class KnowledgeIndex:
    """Passages and their embeddings; :meth:`nearest` returns the top-k passages per query by cosine similarity."""

    def __init__(self, passages: list[Passage], embedder):
        self.passages = passages
        self.embedder = embedder
        self.matrix = self._encode([self._passage_text(p) for p in passages])

    @staticmethod
    def _passage_text(passage: Passage) -> str:
        return f"{passage.title}. {passage.text}" if passage.title else passage.text

    def _encode(self, texts: list[str]) -> np.ndarray:
        vecs = np.asarray(self.embedder.encode(texts), dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)

    def nearest(self, queries: Sequence[str], k: int = 2) -> list[list[Passage]]:
        if not queries:
            return []
        sims = self._encode(list(queries)) @ self.matrix.T
        k = min(k, len(self.passages))
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return [[self.passages[j] for j in row] for row in order]


# --------------------------------------------------------------------------------------------------
# The bundled set
# --------------------------------------------------------------------------------------------------

#: One passage per harm area, written for equi. ``covers`` names the source categories it answers for:
#: ``harmbench:<SemanticCategory>``, ``jbb:<Category>``, ``strongreject:<category>``.
AREAS: list[dict] = [
    {"id": "chem-bio", "title": "Chemical, biological and explosive hazards",
     "covers": ["harmbench:chemical_biological", "jbb:Physical harm"],
     "text": "Toxic chemicals, pathogens and explosives injure or kill people who handle them without training, "
             "and making or acquiring them is a serious crime in most countries. Safe, useful information covers "
             "what the hazard is, how exposure harms the body, how to store household chemicals apart (never mix "
             "bleach with ammonia or acids), and to call emergency services or a poison control centre after "
             "exposure. It never covers synthesis routes, quantities, sourcing or delivery."},
    {"id": "weapons-violence", "title": "Violence and weapons",
     "covers": ["strongreject:Violence", "jbb:Physical harm", "harmbench:harmful"],
     "text": "Violence against people or animals causes lasting physical and psychological harm and is a crime. A safe "
             "answer can explain laws on weapons, the history or psychology of violence, de-escalation, and how to "
             "get help: emergency services when someone is in danger, domestic-violence hotlines, and reporting "
             "threats to the police. It does not help plan, carry out or conceal an attack."},
    {"id": "self-harm", "title": "Self-harm, suicide and eating disorders",
     "covers": ["jbb:Physical harm"],
     "text": "Thoughts of suicide or self-harm and disordered eating are health emergencies that can be treated. A "
             "safe answer responds with care, encourages the person to talk to someone they trust, and points to a "
             "crisis line or emergency services; it never gives methods, doses or ways to hide the behaviour, and "
             "it does not promote extreme dieting."},
    {"id": "cyber", "title": "Malware, hacking and intrusion",
     "covers": ["harmbench:cybercrime_intrusion", "jbb:Malware/Hacking"],
     "text": "Breaking into systems, writing malware or cracking passwords without permission is illegal and harms "
             "the people whose data and services depend on those systems. Useful safe knowledge: how attacks work "
             "at a conceptual level, how to defend (updates, multi-factor authentication, backups, least "
             "privilege), how to report a vulnerability responsibly, and legal paths such as authorised "
             "penetration testing and capture-the-flag exercises."},
    {"id": "misinformation", "title": "Misinformation and disinformation",
     "covers": ["harmbench:misinformation_disinformation", "jbb:Disinformation",
                "strongreject:Disinformation and deception"],
     "text": "False claims about elections, vaccines, disasters, the climate or historical atrocities such as the "
             "Holocaust mislead people and can cause real harm. A safe answer states what the evidence shows, names "
             "reliable sources (public health agencies, electoral authorities, peer-reviewed research, historians), "
             "explains how to check a claim, and declines to write persuasive falsehoods."},
    {"id": "harassment-hate", "title": "Harassment, hate and discrimination",
     "covers": ["harmbench:harassment_bullying", "jbb:Harassment/Discrimination",
                "strongreject:Hate, harassment and discrimination"],
     "text": "Demeaning people for their race, ethnicity, religion, gender, sexuality, disability, age or body harms "
             "them and is unlawful in many settings such as work and housing. A safe answer can explain why "
             "stereotypes are wrong, the history and effects of discrimination, how to respond to bullying and how "
             "to report harassment, without producing insults, slurs, defamation or hateful campaigns."},
    {"id": "fraud", "title": "Fraud, scams and deception",
     "covers": ["jbb:Fraud/Deception", "jbb:Privacy", "strongreject:Non-violent crimes"],
     "text": "Phishing, fake charities, counterfeit medicines, deepfakes and mail or email scams take money and trust "
             "from victims, often the elderly. Safe knowledge: the warning signs of a scam (urgency, requests for "
             "secrecy, gift cards or wire transfers, spoofed senders), how to verify a charity or a sender, and "
             "where to report fraud (the bank, consumer-protection and police fraud units)."},
    {"id": "economic-crime", "title": "Economic crime and financial harm",
     "covers": ["jbb:Economic harm", "harmbench:illegal", "strongreject:Non-violent crimes"],
     "text": "Extortion, tax evasion, insider trading, casino manipulation and predatory lending are crimes or cause "
             "serious financial harm. A safe answer explains the law and its penalties, legal alternatives (tax "
             "advice from a licensed professional, regulated investing), how to recognise pyramid or multi-level "
             "marketing schemes, and where people in debt or with a gambling problem can get free help."},
    {"id": "illegal-goods", "title": "Drugs and illegal goods",
     "covers": ["strongreject:Illegal goods and services", "harmbench:illegal", "jbb:Expert advice"],
     "text": "Illicit drugs, unlicensed weapons, black-market organs and trafficked goods put buyers and others at "
             "risk of overdose, injury, exploitation and prosecution. A safe answer may explain effects and risks, "
             "harm-reduction facts (never use alone, naloxone reverses opioid overdose), the law, and treatment "
             "and support services, but never how to make, buy, sell or smuggle them."},
    {"id": "sexual-content", "title": "Sexual content, exploitation and consent",
     "covers": ["jbb:Sexual/Adult content", "strongreject:Sexual content"],
     "text": "Sexual content involving minors, non-consenting people, animals, drugging or trafficking is abuse and a "
             "crime, and sharing intimate images without consent (revenge porn) is illegal in many places. Safe "
             "knowledge covers consent, sexual health and safer sex, how to recognise grooming and trafficking, and "
             "where victims can get confidential help and have images removed."},
    {"id": "privacy", "title": "Privacy, tracking and identity theft",
     "covers": ["jbb:Privacy"],
     "text": "Tracking someone's location, identifying strangers from photos, stealing identities or personal data "
             "and blackmail violate privacy and are often crimes. A safe answer explains how people can protect "
             "themselves (strong passwords, freezing credit, checking app permissions, recognising stalkerware) and "
             "how to report identity theft, and does not help find or expose a private person."},
    {"id": "expert-advice", "title": "Medical, legal and financial advice",
     "covers": ["jbb:Expert advice"],
     "text": "Questions about treating HIV, schizophrenia or pain, prescriptions, emergencies, or large financial "
             "decisions deserve accurate general information, but a personal plan needs a qualified professional "
             "who knows the case. A safe answer gives well-established facts, says when to see a doctor, lawyer or "
             "licensed adviser, and says to call emergency services in an emergency; it does not tell someone how "
             "to obtain prescription drugs without a prescription."},
    {"id": "government", "title": "Forgery, evading authorities and abusing institutions",
     "covers": ["jbb:Government decision-making", "harmbench:illegal"],
     "text": "Forging documents, altering criminal records, tampering with electronic monitors or elections, hiding "
             "money in shell companies and exploiting child labour break the law and undermine institutions that "
             "protect people. A safe answer explains the legal route instead: record expungement, visa and "
             "immigration advice from an accredited adviser, regulatory compliance, and how to report abuse."},
    {"id": "historical-context", "title": "Discussing atrocities and violent history",
     "covers": ["harmbench:harmful"],
     "text": "Genocides, terrorist attacks, wars and the violent deaths of public figures can and should be discussed "
             "factually: what happened, why, the victims and the lessons drawn. A safe answer is accurate and "
             "respectful to victims, and does not glorify perpetrators or present an atrocity as justified."},
]


def build_bundled_knowledge(data_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the bundled knowledge JSONL, after checking that every harm category of HarmBench, JailbreakBench and
    StrongREJECT in ``data_dir`` (``shared/data``) is covered by at least one passage."""
    data_dir = Path(data_dir)
    wanted: set[str] = set()
    with open(data_dir / "harmbench" / "harmbench_behaviors_text_all.csv", newline="", encoding="utf-8") as fh:
        wanted |= {f"harmbench:{r['SemanticCategory']}" for r in csv.DictReader(fh) if r["SemanticCategory"] != "copyright"}
    with open(data_dir / "refusal_direction_raw" / "jailbreakbench.csv", newline="", encoding="utf-8") as fh:
        wanted |= {f"jbb:{r['Category']}" for r in csv.DictReader(fh)}
    with open(data_dir / "refusal_direction_raw" / "strongreject.csv", newline="", encoding="utf-8") as fh:
        wanted |= {f"strongreject:{r['category']}" for r in csv.DictReader(fh)}
    covered = {c for area in AREAS for c in area["covers"]}
    missing = sorted(wanted - covered)
    if missing:
        raise KnowledgeError(f"no passage covers: {', '.join(missing)}")
    out = Path(out) if out is not None else Path(__file__).parent / "resources" / RESOURCE
    with open(out, "w", encoding="utf-8") as fh:
        for area in AREAS:
            fh.write(json.dumps({"id": area["id"], "title": area["title"], "text": area["text"],
                                 "category": area["covers"], "source": "equi (written for equi)"},
                                ensure_ascii=False) + "\n")
    return out
